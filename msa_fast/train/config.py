"""Training configuration. Keys mirror the ``msa-fast train`` flags (dashes -> underscores);
a YAML or JSON ``--config`` file holds any of them, flags given on the command line win.

Defaults are chosen for a fast CPU run on ``synthetic:mosi`` (aligned data, small hidden
sizes, at most 20 epochs, three seeds, with MMSA's early stopping); raise ``epochs`` for real data.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    # bf16 autocast: True (flag "auto") on CUDA only, "bf16" on every device (the CPU too:
    # avx512_bf16 GEMMs), False ("off") never. See trainer.autocast_enabled.
    amp: bool | str = True
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
    overwrite: bool = False  # replace the run already in ``out`` (else: refuse, or --resume)
    allow_data_change: bool = False  # --resume on other data / another world size, deliberately

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every key, before any data is read or any epoch runs (contract §10):
        a ``ValueError`` naming the key (and its flag), the expected and the received value."""
        for f in dataclasses.fields(self):
            kind, check = _RULES[f.name]
            value = getattr(self, f.name)
            if not _is(kind, value) or (check is not None and not check[0](value)):
                expected = kind + (f" {check[1]}" if check else "")
                flag = _FLAGS.get(f.name, f"--{f.name.replace('_', '-')}")
                raise ValueError(f"{f.name} ({flag}): expected {expected}, "
                                 f"got {value!r} ({type(value).__name__}){_hint(kind, value)}")
        if len(set(self.seeds)) != len(self.seeds):
            dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            raise ValueError(f"seeds (--seeds): expected distinct seeds, got {self.seeds} "
                             f"({dup} repeated: a seed's run directory would be trained twice)")
        if isinstance(self.missing_rate, list) and len(self.missing_rate) not in (1, 3):
            raise ValueError(f"missing_rate (--missing-rate): expected one rate or three (text audio "
                             f"vision), got {len(self.missing_rate)}: {self.missing_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown} (known: {sorted(names)})")
        return cls(**d)


def _is(kind: str, value) -> bool:
    if value is None:
        return "None" in kind
    if isinstance(value, bool):
        return "bool" in kind
    if "number" in kind and isinstance(value, (int, float)):
        return True
    if "integer" in kind and isinstance(value, int):
        return True
    if "list of integers" in kind and isinstance(value, list):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if "list of numbers" in kind and isinstance(value, list):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return ("string" in kind and isinstance(value, str)) or ("mapping" in kind and isinstance(value, dict))


def _hint(kind: str, value) -> str:
    if isinstance(value, str) and "number" in kind:
        try:
            float(value)
        except ValueError:
            return ""
        return ("; YAML 1.1 reads an exponent without a dot (1e-3) as a string: write 1.0e-3, "
                "or give a number in JSON")
    return ""


def _finite(lo: float, lo_open: bool = False):
    def ok(v):
        vals = v if isinstance(v, list) else [v]
        return all(math.isfinite(x) and (x > lo if lo_open else x >= lo) for x in vals)
    return ok


def _rate(v) -> bool:
    vals = v if isinstance(v, list) else [v]
    return all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in vals)


BACKENDS = ("auto", "eager", "triton", "cuda", "cpp")
_FLAGS = {"progress": "--no-progress"}

# key -> (accepted kinds, (extra check, its wording) or None)
_RULES = {
    "model": ("a string", None),
    "data": ("a string", (bool, "(a pickle path or synthetic:<preset>)")),
    "limit": ("an integer or None", (lambda v: v is None or v >= 1, ">= 1")),
    "seeds": ("a list of integers", (bool, "(at least one)")),
    "epochs": ("an integer", (lambda v: v >= 1, ">= 1")),
    "patience": ("an integer", (lambda v: v >= 0, ">= 0")),
    "batch_size": ("an integer", (lambda v: v >= 1, ">= 1")),
    "lr": ("a number", (_finite(0.0, lo_open=True), "> 0 and finite")),
    "weight_decay": ("a number", (_finite(0.0), ">= 0 and finite")),
    "grad_clip": ("a number", (_finite(0.0), ">= 0 and finite (0 disables clipping)")),
    "device": ("a string", None),
    "backend": ("a string", (lambda v: v in BACKENDS, f"in {BACKENDS}")),
    "amp": ("a bool or a string", (lambda v: v in (True, False, "bf16"), 'in (true, false, "bf16")')),
    "out": ("a string or None", (lambda v: v is None or bool(v), "(a directory path)")),
    "resume": ("a bool", None),
    "missing_rate": ("a number or a list of numbers", (_rate, "in [0, 1]")),
    "drop_rate": ("a number", (_rate, "in [0, 1]")),
    "model_cfg": ("a mapping", None),
    "progress": ("a bool", None),
    "num_workers": ("an integer", (lambda v: v >= 0, ">= 0")),
    "threads": ("an integer", (lambda v: v >= 0, ">= 0")),
    "stop_after_epoch": ("an integer or None", (lambda v: v is None or v >= 1, ">= 1")),
    "overwrite": ("a bool", None),
    "allow_data_change": ("a bool", None),
}
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
