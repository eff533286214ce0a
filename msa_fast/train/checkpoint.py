"""Atomic checkpoints: every file is written to a temp file in the same directory, flushed,
fsynced and moved into place with ``os.replace`` (atomic on POSIX), so a crash leaves
either the old or the new file, never a torn one.

A checkpoint of epoch k in a run directory is three files:
``epoch{k}.safetensors`` (model weights), ``epoch{k}.optim.pt`` (optimizer state) and
``state.json`` (epoch, file names, RNG states, best score, history, config), written in that
order: ``state.json`` is the commit record, so it never points at files not yet complete.
Older epoch files are removed only after the new ``state.json`` is in place.
``best.safetensors`` holds the weights of the best epoch (lowest valid loss).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_weights(path: str, module: torch.nn.Module) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, st_save(state))


def load_weights(path: str, module: torch.nn.Module) -> None:
    module.load_state_dict(load_file(path))


def save_torch(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


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
    state = load_json(os.path.join(run_dir, "state.json"))
    load_weights(os.path.join(run_dir, state["weights"]), model)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(run_dir, state["optimizer"]),
                                             map_location="cpu", weights_only=True))
    return state
