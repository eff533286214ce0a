"""``resolve_device(name)``: ``"auto"`` -> CUDA where available, else the CPU; a named CUDA
device without CUDA is a one-line ``RuntimeError``. Its own module so that the run loader
(:func:`msa_fast.train.checkpoint.load_run`) and the trainer share it without importing each
other."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev
