"""Low-latency batched inference: :class:`Predictor` (contract §7) and the HTTP server
(:mod:`msa_fast.inference.server`: KServe v2 and JSON, the ``serve`` extra)."""

from msa_fast.inference.predictor import (
                                          COMPILE_DEFAULT,
                                          DEFAULT_LENGTH_BUCKETS,
                                          Predictor,
                                          collate_samples,
                                          unpack_lstms,
)

__all__ = ["COMPILE_DEFAULT", "DEFAULT_LENGTH_BUCKETS", "Predictor", "collate_samples",
           "unpack_lstms"]
