"""The order in which ``backend="auto"`` tries an op's backends, per device type, as
measured by ``benchmarks/ops/bench_auto.py --write-order`` (generated: do not edit by hand;
rerun the benchmark). An (op, device) missing here uses the order its descriptor
declares (``Fused.auto`` / ``rank``, see ``msa_fast/_backend.py``).

Last written from: AMD EPYC, 1 thread(s), torch 2.14.1+cu130, commit c7ec856.
"""

MEASURED: dict[str, dict[str, tuple[str, ...]]] = {'cpu': {'add_layer_norm': ('eager', 'compile'),
         'attention': ('cpp', 'sdpa', 'eager'),
         'dual_gate': ('compile', 'eager'),
         'fd_cmdie_contrastive_loss': ('compile', 'eager'),
         'gated_attention_pool': ('compile', 'eager'),
         'mine_pairs': ('cpp', 'eager'),
         'nt_xent': ('compile', 'eager'),
         'triplet': ('compile', 'eager')}}
