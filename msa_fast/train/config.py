"""Training configuration. Keys mirror the ``msa-fast train`` flags (dashes -> underscores);
a YAML or JSON ``--config`` file holds any of them, flags given on the command line win.

Defaults are chosen for a fast CPU run on ``synthetic:mosi`` (aligned data, small hidden
sizes, at most 20 epochs, three seeds, with MMSA's early stopping); raise ``epochs`` for real data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    model: str = "lf_dnn"
    data: str = "synthetic:mosi"
    limit: int | None = None  # first N samples of every split
    seeds: list[int] = field(default_factory=lambda: [1111, 1112, 1113])
    epochs: int = 20  # maximum; early stopping (patience 8) often ends sooner
    patience: int = 8  # MMSA early_stop
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    device: str = "auto"
    backend: str = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    out: str | None = None
    resume: bool = False
    missing_rate: float | list[float] = 0.0
    drop_rate: float = 0.0
    model_cfg: dict = field(default_factory=dict)  # hidden, av_hidden, dropout, text_model...
    progress: bool = True
    num_workers: int = 0
    # CPU intra-op threads while training. 1 by default: with these small models the
    # OpenMP synchronisation of 2 threads cost 20x (132 s vs 6 s for 3 lf_dnn epochs on
    # synthetic:mosi, 2-core VM). 0 keeps torch's setting.
    threads: int = 1
    stop_after_epoch: int | None = None  # stop (as if interrupted) after this epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown} (known: {sorted(names)})")
        return cls(**d)


def read_config_file(path: str) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON file of config keys; dashes in keys become underscores."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # yaml / json errors have many types
        raise ValueError(f"config file {path}: cannot parse ({type(e).__name__}: {e})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"config file {path}: expected a mapping of keys, got {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}
