"""The calls ``gpu_check.sh`` runs under ``compute-sanitizer`` (memcheck / racecheck): one
odd-shaped forward + backward per Triton op (sizes that are no multiple of any block, so every
masked edge is read and written) and the CUDA ``mine_pairs`` kernel per dtype (D odd: its
padded path; a duplicated row: exact ties). Under memcheck run it with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: the caching allocator hands out pieces of larger blocks,
inside which an overrun is invisible to the sanitizer.

    python tools/sanitize_calls.py [--device cuda|cpu] [--only triton|cuda]

On the CPU (``TRITON_INTERPRET=1``) it runs the same Triton calls through the interpreter,
which is how the tests check that the list still builds and runs (the CUDA part skips there).
Prints one ``ok`` line per call; any exception fails the run."""
import argparse
import importlib
import os
import sys

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import torch

if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU run: Triton 3.6's interpreter needs its fix
    from tools.triton_interpreter import fix_interpreter_index

    fix_interpreter_index()

# (op, builder module of benchmarks/ops/, odd shape): the benchmark builders' shape conventions
TRITON_CALLS = [
    ("dual_gate", "bench_dual_gate", (7, 3, 37, 7)),
    ("gated_attention_pool", "bench_gap", (3, 5, 13, 40)),
    ("add_layer_norm", "bench_layer_norm", (3, 13, 40)),
    ("attention", "bench_attention", (2, 3, 37, 29, 24)),
    ("nt_xent", "bench_contrastive", (5, 3, 40)),
    ("triplet", "bench_contrastive", (5, 3, 40)),
    ("fd_cmdie_contrastive_loss", "bench_contrastive", (5, 3, 40)),
]


def _builder(op: str, module: str):
    mod = importlib.import_module(f"benchmarks.ops.{module}")
    if module == "bench_contrastive":
        return mod.OPS[op][0]
    return mod.build


def triton_calls(device: str) -> list[str]:
    out = []
    for op, module, shape in TRITON_CALLS:
        torch.manual_seed(0)
        inputs, call = _builder(op, module)(shape, device, torch.float32)
        res = call("triton")()
        res = res if isinstance(res, (tuple, list)) else (res,)
        loss = sum(r.float().sum() for r in res if isinstance(r, torch.Tensor) and r.is_floating_point())
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if not all(g is not None and bool(torch.isfinite(g).all()) for g in grads):
            raise RuntimeError(f"{op} {shape}: a gradient is missing or not finite")
        out.append(f"triton {op} {shape} ok")
    # mining's Triton kernel: forward only (no gradient)
    from msa_fast.ops import mine_pairs

    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 37, generator=g).to(device)
    labels = torch.randint(0, 4, (300,), generator=g).to(device)
    mine_pairs(f, labels, 10, backend="triton")
    out.append("triton mine_pairs (300, 37, 10) ok")
    return out


def cuda_mining_calls() -> list[str]:
    import msa_fast

    out = []
    for name in ("float32", "float16", "bfloat16", "float64"):
        g = torch.Generator().manual_seed(0)
        f = torch.randn(300, 37, generator=g).to("cuda", getattr(torch, name))  # D odd: the padded path
        f[10] = f[3]
        labels = torch.randint(0, 4, (300,), generator=g).cuda()
        res = msa_fast.ops.mine_pairs(f, labels, 10, backend="cuda")
        q = msa_fast.ops.mine_pairs(f, labels, 5, f[:40], labels[:40], torch.arange(40, device="cuda"),
                                    backend="cuda")
        torch.cuda.synchronize()
        out.append(f"cuda mine_pairs {name} ok {tuple(res.pos_idx.shape)} {tuple(q.pos_idx.shape)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=("triton", "cuda"), default=None)
    args = p.parse_args(argv)
    lines = []
    if args.only in (None, "triton"):
        lines += triton_calls(args.device)
    if args.only in (None, "cuda") and args.device == "cuda":
        lines += cuda_mining_calls()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
