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
