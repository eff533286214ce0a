"""Data: MMSA pickles (:mod:`.mmsa`, schema in :mod:`.schema`), the synthetic generator
(:mod:`.synthetic`), batches with padding masks (:mod:`.loader`), missing-modality
protocols (:mod:`.missing`) and ``PATH | synthetic:<preset>`` resolution (:mod:`.source`)."""

from msa_fast.data.loader import BucketBatchSampler, gather_batch, make_loader
from msa_fast.data.missing import MissingProtocol, apply_missing_rate, apply_modality_drop
from msa_fast.data.mmsa import MMSAData, SplitData, from_pickle_dict, load_pickle
from msa_fast.data.schema import PRESET_DIMS, SPLITS, SchemaError, check_pickle
from msa_fast.data.source import load_data, parse_synthetic

__all__ = [
    "PRESET_DIMS",
    "SPLITS",
    "BucketBatchSampler",
    "MMSAData",
    "MissingProtocol",
    "SchemaError",
    "SplitData",
    "apply_missing_rate",
    "apply_modality_drop",
    "check_pickle",
    "from_pickle_dict",
    "gather_batch",
    "load_data",
    "load_pickle",
    "make_loader",
    "parse_synthetic",
]
