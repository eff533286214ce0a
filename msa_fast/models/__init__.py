"""Model registry: ``build_model(name, dims, **cfg) -> nn.Module``.

Interface every registered model follows (so the trainer, the CLI and evaluation need no
per-model code):

- constructor ``Model(dims, **cfg)``; ``dims = {"text": 768, "audio": da, "vision": dv,
  "text_input": "features" | "bert"}`` (``MMSAData.dims``); unknown ``cfg`` keys are ignored
  (take ``**_``) so that one config file can serve several models in Python, while the
  command line checks ``--model-cfg`` with :func:`check_model_cfg` (names and annotated
  types of the constructor's keywords);
- ``forward(batch) -> dict`` with ``"pred"`` ``(B,)`` float (the regression output) and,
  optionally, ``"loss_extra"`` (a scalar added to the L1 loss, e.g. a contrastive term) and
  anything else for logging. ``batch`` is the dict of :mod:`msa_fast.data.loader`
  (``text`` or ``text_bert``, ``audio``, ``vision``, ``*_mask`` True = padding,
  ``*_lengths``, ``labels``, ``present``);
- optionally, ``upgrade_state_dict(state) -> state`` (a static method): maps the weights of a
  checkpoint written by an earlier parameter layout onto this one (it returns a state that
  already fits unchanged), or raises ``ValueError`` saying why it cannot;
  :func:`msa_fast.train.checkpoint.load_weights` calls it on every load.

Registering: decorate the class with ``@register_model("name")``. A name not yet registered
is looked up by importing ``msa_fast.models.<name>`` (which registers itself), so
``agfn``, ``fd_cmdie`` and ``promma`` plug in by adding their module.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
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


BUILTIN_MODULES = ("baselines", "agfn", "fd_cmdie", "promma")


def _import_builtin() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"msa_fast.models.{mod}")


def model_params(name: str) -> dict[str, inspect.Parameter]:
    """The hyper-parameters model ``name`` takes (its constructor's keywords after ``dims``)."""
    sig = inspect.signature(_lookup(name).__init__)
    return {k: p for i, (k, p) in enumerate(sig.parameters.items())
            if i > 1 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


# Hyper-parameter defaults that have changed. A run records every hyper-parameter it was
# built with (``model_hparams`` in its state, :func:`model_hparams`); one written before that
# was built with these defaults under its own ``model_cfg``, and loads with them.
PREVIOUS_DEFAULTS: dict[str, dict] = {
    "agfn": {"tau": 0.5},  # 0.5 -> 0.05 (issue 22: the gate separates corrupted text / audio)
}

_PLAIN = (type(None), bool, int, float, str)


def model_hparams(name: str, cfg: dict) -> dict:
    """Every hyper-parameter of model ``name`` as a build with ``cfg`` uses it (the defaults
    filled in; JSON values only): what a run records, so that a later change of a default
    cannot change how it loads (:func:`run_hparams`)."""
    out = {k: p.default for k, p in model_params(name).items()
           if p.default is not inspect.Parameter.empty and isinstance(p.default, _PLAIN)}
    out.update(cfg)
    return out


def run_hparams(name: str, state: dict) -> dict:
    """The hyper-parameters to rebuild the model of a run's ``state`` with: the recorded ones,
    or, for a run written before they were recorded, its ``model_cfg`` over the defaults of
    that time (:data:`PREVIOUS_DEFAULTS`)."""
    if state.get("model_hparams") is not None:
        return dict(state["model_hparams"])
    return {**PREVIOUS_DEFAULTS.get(name, {}), **(state.get("model_cfg") or {})}


def _type_ok(kind: str, value) -> bool:
    kind = kind.strip()
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(_type_ok(kind[5:-1], v) for v in value)
    return True  # an annotation this check does not know: the model checks it


def check_model_cfg(name: str, cfg: dict) -> None:
    """Check ``cfg`` against model ``name``'s constructor before anything is built: every key
    must be one of its hyper-parameters (the error names the nearest one and lists them all),
    every value of the annotated type (``int`` is not ``16.5`` nor ``"2"``; a ``float``
    takes an int), and a ``text_model`` must be a local directory (nothing is downloaded).
    Raises ``ValueError`` naming the key, the expected and the received value."""
    params = model_params(name)
    for key, value in cfg.items():
        if key not in params:
            near = difflib.get_close_matches(key, params, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"model_cfg: model {name!r} has no hyper-parameter {key!r} ({hint}"
                             f"it takes: {', '.join(params)})")
        ann = params[key].annotation
        if ann is inspect.Parameter.empty:
            default = params[key].default
            ann = "" if default is None or default is inspect.Parameter.empty else type(default).__name__
        ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        if ann and not any(_type_ok(k, value) for k in ann.split("|")):
            raise ValueError(f"model_cfg: {name} {key} expected {ann}, got {value!r} "
                             f"({type(value).__name__})")
    text_model = cfg.get("text_model")
    if text_model and not os.path.isdir(os.path.expanduser(text_model)):
        raise ValueError(f"model_cfg: text_model {text_model!r} is not a directory (a local "
                         f"Hugging Face model directory is expected; nothing is downloaded)")


def available_models() -> list[str]:
    """Every registered model: the built-in ones (imported on the first call) and any
    registered by user code."""
    _import_builtin()
    return sorted(_REGISTRY)


def _register_builtin() -> None:
    from msa_fast.models.baselines import LFDNN, TextOnly

    register_model("text_only")(TextOnly)
    register_model("lf_dnn")(LFDNN)


_register_builtin()

__all__ = ["PREVIOUS_DEFAULTS", "UnknownModelError", "available_models", "build_model", "check_model_cfg",
           "model_hparams", "model_params", "run_hparams", "register_model"]
