"""The functional API of msa_fast (contract §3).

Every op validates its inputs (``ValueError`` naming the argument), resolves its
backend (``backend=None`` uses :func:`msa_fast.set_backend`'s default, ``"auto"``
picks the fastest available) and runs. ``msa_fast.ops.reference`` holds the eager
ground truth of each.
"""

from msa_fast.ops import reference
from msa_fast.ops.attention import attention
from msa_fast.ops.contrastive import fd_cmdie_contrastive_loss, nt_xent, triplet
from msa_fast.ops.dipu import dipu
from msa_fast.ops.dual_gate import dual_gate
from msa_fast.ops.gap import gated_attention_pool
from msa_fast.ops.layer_norm import add_layer_norm
from msa_fast.ops.pair_mining import MinedPairs, mine_pairs, mine_pairs_chunked, sentiment_classes

__all__ = [
    "MinedPairs",
    "add_layer_norm",
    "attention",
    "dipu",
    "dual_gate",
    "fd_cmdie_contrastive_loss",
    "gated_attention_pool",
    "mine_pairs",
    "mine_pairs_chunked",
    "nt_xent",
    "reference",
    "sentiment_classes",
    "triplet",
]
