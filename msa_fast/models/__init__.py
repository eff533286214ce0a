"""Model registry: ``build_model(name, dims, **cfg) -> nn.Module``.

Interface every registered model follows (so the trainer, the CLI and evaluation need no
per-model code):

- constructor ``Model(dims, **cfg)``; ``dims = {"text": 768, "audio": da, "vision": dv,
  "text_input": "features" | "bert"}`` (``MMSAData.dims``); unknown ``cfg`` keys are ignored
  (take ``**_``) so that one config file can serve several models;
- ``forward(batch) -> dict`` with ``"pred"`` ``(B,)`` float (the regression output) and,
  optionally, ``"loss_extra"`` (a scalar added to the L1 loss, e.g. a contrastive term) and
  anything else for logging. ``batch`` is the dict of :mod:`msa_fast.data.loader`
  (``text`` or ``text_bert``, ``audio``, ``vision``, ``*_mask`` True = padding,
  ``*_lengths``, ``labels``, ``present``).

Registering: decorate the class with ``@register_model("name")``. A name not yet registered
is looked up by importing ``msa_fast.models.<name>`` (which registers itself), so
``agfn``, ``fd_cmdie`` and ``promma`` plug in by adding their module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


class UnknownModelError(ValueError):
    pass


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY and name.isidentifier():
        try:
            importlib.import_module(f"msa_fast.models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"msa_fast.models.{name}":
                raise
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r} (available: {', '.join(available_models())})")
    return _REGISTRY[name]


def build_model(name: str, dims: dict, **cfg) -> nn.Module:
    """Construct model ``name`` for data of widths ``dims`` with hyper-parameters ``cfg``."""
    return _lookup(name)(dims, **cfg)


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def _register_builtin() -> None:
    from msa_fast.models.baselines import LFDNN, TextOnly

    register_model("text_only")(TextOnly)
    register_model("lf_dnn")(LFDNN)


_register_builtin()

__all__ = ["UnknownModelError", "available_models", "build_model", "register_model"]
