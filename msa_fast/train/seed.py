"""MMSA's seed setup (``setup_seed``): python ``random``, numpy, torch (CPU and every CUDA
device) seeded with the same value (:func:`set_seed`), and cuDNN deterministic and not
benchmarking for the span of a run (:func:`cudnn_deterministic`, a scope: torch's flags are
restored afterwards instead of being left changed for the whole process). Plus capture /
restore of every RNG state, for checkpoints (JSON-safe)."""

from __future__ import annotations

import base64
import contextlib
import inspect
import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def cudnn_deterministic():
    """cuDNN deterministic and not benchmarking inside the ``with`` (MMSA's setting), every
    other cuDNN flag as it was; all restored on exit. Through ``torch.backends.cudnn.flags``,
    whose defaults would reset the flags it is not given, so it gets each one's current
    value (the set of flags differs between torch versions)."""
    cudnn = torch.backends.cudnn
    current = {name: getattr(cudnn, name) for name in inspect.signature(cudnn.flags).parameters
               if hasattr(cudnn, name)}
    with cudnn.flags(**{**current, "benchmark": False, "deterministic": True}):
        yield


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """All RNG states as JSON-serialisable values."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
