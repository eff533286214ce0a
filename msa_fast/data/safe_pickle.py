"""Load untrusted pickles without running their code (contract §5, last bullet).

A pickle is a program: ``GLOBAL`` / ``STACK_GLOBAL`` opcodes import any callable and
``REDUCE`` calls it, so ``pickle.load`` of a downloaded ``aligned_50.pkl`` can run
``os.system``. :class:`RestrictedUnpickler` resolves only the globals that the MMSA
schema needs and refuses every other one *before* it is imported:

- containers and scalars (dict, list, tuple, set, str, bytes, int, float, bool, None)
  need no global at protocol >= 4; older protocols name ``builtins.set`` /
  ``frozenset`` / ``bytearray`` / ``complex`` and ``_codecs.encode`` (protocol <= 2
  stores ``bytes`` that way), and ``collections.OrderedDict`` is a dict;
- numpy arrays, dtypes and scalars: ``numpy.ndarray``, ``numpy.dtype`` and the
  reconstructors ``_reconstruct``, ``scalar`` and ``_frombuffer`` (protocol 5), under
  numpy 2's ``numpy._core`` and numpy 1's ``numpy.core`` names (MMSA's pickles were
  written by numpy 1). They are mapped to the installed numpy's own functions, so
  old pickles load without numpy's deprecation shim.

The reconstructors only build arrays of the classes and dtypes they are handed, and
those come through the same filter, so nothing outside this list can be reached.
"""

from __future__ import annotations

import collections
import pickle

import numpy as np

from msa_fast.data.schema import SchemaError

_np_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_np_numeric = np._core.numeric if hasattr(np, "_core") else np.core.numeric

_NUMPY = {
    "ndarray": np.ndarray,
    "dtype": np.dtype,
    "_reconstruct": _np_multiarray._reconstruct,
    "scalar": _np_multiarray.scalar,
    "_frombuffer": _np_numeric._frombuffer,
}
_NUMPY_MODULES = {
    "numpy": ("ndarray", "dtype"),
    "numpy.core.multiarray": ("_reconstruct", "scalar"),
    "numpy._core.multiarray": ("_reconstruct", "scalar"),
    "numpy.core.numeric": ("_frombuffer",),
    "numpy._core.numeric": ("_frombuffer",),
}

ALLOWED: dict[tuple[str, str], object] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(mod, name): _NUMPY[name] for mod, names in _NUMPY_MODULES.items() for name in names},
}


class UnsafePickleError(SchemaError):
    """The pickle names a global outside :data:`ALLOWED`; nothing of it was run."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED` globals (see module doc)."""

    def find_class(self, module: str, name: str):
        # Protocol <= 2 pickles name Python 2's module; the allow list uses Python 3's.
        key = ("builtins" if module == "__builtin__" else module, name)
        if key not in ALLOWED:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} (pickles can run code; only the MMSA "
                f"schema's types are loaded: dicts, lists, str, numbers, numpy arrays and dtypes)")
        return ALLOWED[key]


def load(f):
    """Unpickle the open binary file ``f`` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(f).load()
