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
import io
import json
import math
import os
import tempfile

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` (Linux >= 4.7) where it can be read
    without changing it; else set-and-restore (which another thread could observe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``), with the mode
    a plain ``open(path, "w")`` would give: 0666 less the umask (0644 under 022).
    ``mkstemp`` creates its file 0600, which another user -- a serving container -- could
    not read."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def save_weights(path: str, module: torch.nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, st_save(state))


def load_weights(path: str, module: torch.nn.Module) -> None:
    with _reading(path, "checkpoint weights"):
        tensors = load_file(path)
    upgrade = getattr(module, "upgrade_state_dict", None)
    if upgrade is not None:  # an earlier parameter layout (see msa_fast.models)
        try:
            tensors = upgrade(tensors)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model "
                              f"({str(e).splitlines()[0]})") from None


def save_torch(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(json_safe(obj), indent=1, allow_nan=False).encode())


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
    weights, optim = f"epoch{epoch}.safetensors", f"epoch{epoch}.optim.pt"
    save_weights(os.path.join(run_dir, weights), model)
    save_torch(os.path.join(run_dir, optim), optimizer.state_dict())
    save_json(os.path.join(run_dir, "state.json"),
              dict(state, epoch=epoch, weights=weights, optimizer=optim))
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
