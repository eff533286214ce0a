"""Low-latency batched inference: :class:`Predictor` (SPEC §7) and the LitServe API
(:mod:`msa_fast.inference.server`, the ``serve`` extra)."""

from msa_fast.inference.predictor import (
                                          COMPILE_DEFAULT,
                                          DEFAULT_LENGTH_BUCKETS,
                                          Predictor,
                                          collate_samples,
                                          unpack_lstms,
)

__all__ = ["COMPILE_DEFAULT", "DEFAULT_LENGTH_BUCKETS", "Predictor", "collate_samples",
           "unpack_lstms"]
