"""The functional API of msa_fast (SPEC section 3).

Every op validates its inputs (``ValueError`` naming the argument), resolves its
backend (``backend=None`` uses :func:`msa_fast.set_backend`'s default, ``"auto"``
picks the fastest available) and runs. ``msa_fast.ops.reference`` holds the eager
ground truth of each.
"""

from msa_fast.ops import reference
from msa_fast.ops.pair_mining import MinedPairs, mine_pairs, sentiment_classes

__all__ = ["MinedPairs", "mine_pairs", "reference", "sentiment_classes"]
