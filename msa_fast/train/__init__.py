"""Training: :class:`TrainConfig`, :func:`train_seed` (one seed, checkpoints, resume),
:func:`run_experiment` (several seeds -> mean ± std, ``results.json``)."""

from msa_fast.train.config import TrainConfig, read_config_file
from msa_fast.train.experiment import format_table, run_experiment
from msa_fast.train.seed import set_seed
from msa_fast.train.trainer import EpochContext, NonFiniteLossError, evaluate, predict, train_seed

__all__ = [
    "EpochContext",
    "NonFiniteLossError",
    "TrainConfig",
    "evaluate",
    "format_table",
    "predict",
    "read_config_file",
    "run_experiment",
    "set_seed",
    "train_seed",
]
