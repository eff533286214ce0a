"""Atomic checkpoints: every file is written to a temp file in the same directory, flushed,
fsynced and moved into place with ``os.replace`` (atomic on POSIX), so a crash leaves
either the old or the new file, never a torn one.

A checkpoint of epoch k in a run directory is three files:
``epoch{k}.safetensors`` (model weights), ``epoch{k}.optim.pt`` (optimizer state) and
``state.json`` (epoch, file names, RNG states, best score, history, config), written in that
order: ``state.json`` is the commit record, so it never points at files not yet complete.
Older epoch files are removed only after the new ``state.json`` is in place.
``best.safetensors`` holds the weights of the best epoch (lowest valid loss).

Reading a checkpoint that is truncated, corrupt or missing raises :class:`CheckpointError`
naming the file. JSON is written strictly (``allow_nan=False``): a non-finite float is
stored as ``null``, so ``results.json`` and ``state.json`` are valid JSON for any reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from msa_fast import _io
from msa_fast._io import atomic_write_bytes  # noqa: F401 (re-exported: the run files' writer)
from msa_fast.train.config import TrainConfig


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names it."""


def _reading(path: str, what: str):
    """Context: any error while reading ``path`` becomes a one-line :class:`CheckpointError`."""
    @contextlib.contextmanager
    def ctx():
        if not os.path.isfile(path):
            raise CheckpointError(f"{what} not found: {path}")
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # safetensors, torch.load and json fail in many types
            msg = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{path}: cannot read the {what} ({type(e).__name__}: "
                                  f"{msg[:200]}); the file is truncated or corrupt") from None
    return ctx()


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_weights(path: str, module: torch.nn.Module) -> str:
    """Write the module's weights (safetensors, atomically); returns their SHA-256 (hex), which
    the run's ``state.json`` records under ``checksums`` so that a load can verify them."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = st_save(state)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _recorded_checksum(path: str) -> str | None:
    """The SHA-256 that the ``state.json`` beside ``path`` records for it, if any (runs from
    before checksums were recorded have none, and load unverified)."""
    state_path = os.path.join(os.path.dirname(os.path.abspath(path)), "state.json")
    try:
        with open(state_path) as fh:
            sums = json.load(fh).get("checksums") or {}
    except (OSError, ValueError, AttributeError):
        return None
    value = sums.get(os.path.basename(path)) if isinstance(sums, dict) else None
    return value if isinstance(value, str) else None


def load_weights(path: str, module: torch.nn.Module) -> None:
    """Load a weights file into ``module``: verified against the checksum its run recorded
    (a flipped byte behind an intact header would otherwise load and predict nonsense),
    upgraded from an earlier parameter layout, every key checked. Errors are one-line
    :class:`CheckpointError` naming the file."""
    with _reading(path, "checkpoint weights"):
        with open(path, "rb") as fh:
            data = fh.read()
        want = _recorded_checksum(path)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{path}: the weights do not match the checksum recorded in "
                                  f"{os.path.join(os.path.dirname(path) or '.', 'state.json')}: "
                                  "the file is corrupt or was replaced")
        tensors = st_load(data)
    upgrade = getattr(module, "upgrade_state_dict", None)
    if upgrade is not None:  # an earlier parameter layout (see msa_fast.models)
        try:
            tensors = upgrade(tensors)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in own)
    misshaped = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = [f"missing {len(missing)} keys: {few(missing)}" if missing else "",
                 f"unexpected {len(unexpected)} keys: {few(unexpected)}" if unexpected else "",
                 f"other shapes (file vs model): {few(misshaped)}" if misshaped else ""]
        raise CheckpointError(f"{path}: weights do not fit the model {type(module).__name__} ("
                              + "; ".join(p for p in parts if p) + ")")
    module.load_state_dict(tensors)


def save_torch(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: str, obj) -> None:
    """The run files' JSON: strict (a non-finite float is ``null``), indent 1."""
    _io.save_json(path, json_safe(obj), indent=1, allow_nan=False)


def load_json(path: str, what: str = "JSON file"):
    with _reading(path, what), open(path) as f:
        return json.load(f)


def read_state(run_dir: str) -> dict:
    """``run_dir/state.json``, checked to be a checkpoint's commit record."""
    path = os.path.join(run_dir, "state.json")
    state = load_json(path, "checkpoint state")
    missing = [k for k in ("epoch", "weights", "optimizer", "config", "history")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint state (missing {missing})")
    return state


def save_checkpoint(run_dir: str, epoch: int, model, optimizer, state: dict) -> None:
    """Epoch ``epoch``'s weights and optimizer state, then ``state.json`` (the commit record)
    with the SHA-256 of the weights under ``checksums`` (next to ``best.safetensors``'s,
    which the caller puts in ``state["checksums"]``)."""
    weights, optim = f"epoch{epoch}.safetensors", f"epoch{epoch}.optim.pt"
    sums = {k: v for k, v in (state.get("checksums") or {}).items() if not k.startswith("epoch")}
    sums[weights] = save_weights(os.path.join(run_dir, weights), model)
    save_torch(os.path.join(run_dir, optim), optimizer.state_dict())
    save_json(os.path.join(run_dir, "state.json"),
              dict(state, epoch=epoch, weights=weights, optimizer=optim, checksums=sums))
    for name in os.listdir(run_dir):  # older epochs, now unreferenced
        if name.startswith("epoch") and name not in (weights, optim):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(run_dir, name))


def load_checkpoint(run_dir: str, model, optimizer) -> dict:
    state = read_state(run_dir)
    load_weights(os.path.join(run_dir, state["weights"]), model)
    if optimizer is not None:
        path = os.path.join(run_dir, state["optimizer"])
        with _reading(path, "optimizer state"):
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return state


# -- reading a run -------------------------------------------------------------------------
#
# THE way a trained run is read (``msa-fast eval / predict / export / serve / analyze``,
# :func:`msa_fast.robustness.load_run`, :meth:`msa_fast.inference.Predictor.from_checkpoint`):
# one seed directory, its ``state.json``, the model built through the registry, the weights
# loaded by :func:`load_weights` (checksum, upgrade hook, every key checked).

STATE_FILE = "state.json"
BEST_WEIGHTS = "best.safetensors"
WEIGHTS = ("best", "last")
_RUN_KEYS = ("model", "dims", "data", "seed")


def resolve_run(path: str) -> tuple[str, str | None]:
    """``(seed directory, weights file or None)`` of ``path``: a seed's run directory
    (``out/seed_<seed>``, holding ``state.json``), its ``state.json``, or one of its weights
    files (``best.safetensors``, ``epoch<k>.safetensors``: those weights are read). A run
    directory of several seeds is refused with their names; one-line :class:`CheckpointError`."""
    path = os.fspath(path)
    if os.path.isfile(path):
        d = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        if os.path.isfile(os.path.join(d, STATE_FILE)):
            if name == STATE_FILE:
                return d, None
            if name.endswith(".safetensors"):
                return d, name
        raise CheckpointError(f"no checkpoint in {path} (expected a run directory with {STATE_FILE}, "
                              f"its {STATE_FILE} or one of its .safetensors files)")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        seeds = sorted(d for d in os.listdir(path) if d.startswith("seed_")) if os.path.isdir(path) else []
        hint = f"; pass one seed's directory: {', '.join(seeds)}" if seeds else ""
        raise CheckpointError(f"no checkpoint in {path} ({STATE_FILE} not found{hint})")
    return path, None


def read_run_state(path: str) -> dict:
    """The ``state.json`` of the run at ``path`` (any form of :func:`resolve_run`), checked to
    hold what a run loader needs (model, dims, data, seed)."""
    run_dir, _ = resolve_run(path)
    state = read_state(run_dir)
    missing = [k for k in _RUN_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{os.path.join(run_dir, STATE_FILE)}: not the state of a trained run "
                              f"(missing {missing})")
    return state


@dataclasses.dataclass
class Run:
    """A trained run read by :func:`load_run`: ``model`` (weights loaded, eval mode, on
    ``device``), the run's ``state`` (its ``state.json``), its training ``config``
    (:class:`~msa_fast.train.config.TrainConfig`, a copy the caller may change), the seed
    directory ``run_dir``, ``weights`` (``"best"``, ``"last"`` or the file name asked for) and
    ``weights_path`` (the file read)."""

    model: torch.nn.Module
    state: dict
    config: TrainConfig
    run_dir: str
    weights: str
    weights_path: str
    device: torch.device

    @property
    def model_name(self) -> str:
        return self.state["model"]

    @property
    def model_cfg(self) -> dict:
        return dict(self.state.get("model_cfg") or {})

    @property
    def dims(self) -> dict:
        return self.state["dims"]

    @property
    def aligned(self) -> bool | None:
        """Whether the run trained on aligned data (one length for all modalities); ``None``
        for a run from before it was recorded."""
        return self.state.get("aligned")

    @property
    def seed(self) -> int:
        return self.state["seed"]

    @property
    def data_spec(self) -> str:
        return self.state["data"]

    def load_data(self, data=None):
        """The data to evaluate this run on: ``None`` -- the run's own, with the run's
        ``limit``; a data spec -- loaded whole (as ``msa-fast eval --data`` does); or an
        :class:`~msa_fast.data.mmsa.MMSAData` already loaded. Its widths must be the run's
        (``ValueError`` otherwise)."""
        from msa_fast.data.mmsa import MMSAData
        from msa_fast.data.source import load_data

        if not isinstance(data, MMSAData):
            data = load_data(data or self.data_spec, limit=None if data else self.config.limit)
        if data.dims != self.dims:
            raise ValueError(f"data widths {data.dims} differ from the checkpoint's {self.dims}")
        return data


def load_run(path: str, weights: str = "best", device="auto", *, model: str | None = None) -> Run:
    """Read the trained run at ``path`` (a seed directory, its ``state.json`` or a weights file:
    :func:`resolve_run`) -> :class:`Run`. ``weights``: ``"best"`` (``best.safetensors``) or
    ``"last"`` (the last epoch's); a weights file given as ``path`` wins. ``device``: ``"auto"``,
    a name or a ``torch.device``. ``model``: the model name the caller expects (a run of another
    model is refused). The model is built through :func:`msa_fast.models.build_model` and
    loaded by :func:`load_weights` (checksum, the model's ``upgrade_state_dict``, every key).
    Every problem is a one-line ``ValueError`` (:class:`CheckpointError`) naming the path."""
    from msa_fast.models import build_model, run_hparams
    from msa_fast.train.device import resolve_device

    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected 'best' or 'last', got {weights!r}")
    run_dir, weights_file = resolve_run(path)
    state = read_run_state(run_dir)
    if model is not None and state["model"] != model:
        raise CheckpointError(f"expected a checkpoint of model {model!r}, got one of "
                              f"{state['model']!r} ({run_dir})")
    if weights_file is None:
        weights_file = BEST_WEIGHTS if weights == "best" else state["weights"]
    else:
        weights = weights_file
    weights_path = os.path.join(run_dir, weights_file)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(run_dir, STATE_FILE)}: its config cannot be read "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    net = build_model(state["model"], state["dims"], **run_hparams(state["model"], state))
    load_weights(weights_path, net)  # CheckpointError naming the file
    net.to(dev).eval()
    return Run(model=net, state=state, config=config, run_dir=run_dir, weights=weights,
               weights_path=weights_path, device=dev)
