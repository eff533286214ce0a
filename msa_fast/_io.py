"""Writing files: atomic bytes and JSON, and one matplotlib figure per PNG.

A foundation module: it imports nothing from ``msa_fast`` (``tests/test_layers.py``), so
that the checkpoints (:mod:`msa_fast.train.checkpoint`), the analyses and the scripts of
``benchmarks/``, ``experiments/`` and ``tools/`` share one writer.

- :func:`atomic_write_bytes`: a temp file in the same directory, flushed, fsynced and moved
  into place with ``os.replace`` (atomic on POSIX), so a crash or a failed write leaves the
  old file or the new one, never a torn one; parent directories are created;
- :func:`save_json`: ``json.dumps`` then :func:`atomic_write_bytes`; numpy and torch scalars
  and arrays become numbers and lists; a value that cannot be serialised raises before
  anything is written;
- :func:`figure`: the matplotlib preamble (the Agg backend, ``plt.subplots``) and epilogue
  (``tight_layout``, ``savefig`` at a dpi, ``plt.close``) around the drawing code;
  :func:`save_figure` the epilogue alone, :func:`pyplot` the preamble alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


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


def _default(obj: Any) -> Any:
    """numpy / torch scalars and arrays (anything with ``tolist``; 0-d gives a number)."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def save_json(path: str, obj: Any, *, indent: int | None = 2, allow_nan: bool = True,
              sort_keys: bool = False, newline: bool = False) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write_bytes`); returns
    ``path``. The text is serialised first: a failure (an object JSON cannot hold, a NaN with
    ``allow_nan=False``) raises with the old file, if any, untouched and no temp file left."""
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan, sort_keys=sort_keys, default=_default)
    atomic_write_bytes(path, (text + ("\n" if newline else "")).encode())
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); :class:`ImportError`
    with the install line when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("matplotlib is needed for the figures: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def have_matplotlib() -> bool:
    """Whether :func:`figure` can draw (the benchmarks skip their PNG without it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def save_figure(fig: Any, path: str, *, dpi: int = 110, tight: bool = True) -> str:
    """Lay ``fig`` out (``tight_layout``), save it to ``path`` at ``dpi`` (parent directories
    created) and close it, also when saving fails; returns ``path``. For a figure made
    elsewhere (an analysis that returns its figure); :func:`figure` ends with it."""
    try:
        if tight:
            fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path


@contextlib.contextmanager
def figure(path: str, nrows: int = 1, ncols: int = 1, *, dpi: int = 110, tight: bool = True,
           **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, 1, 2, figsize=(10, 4)) as (fig, axes): ...`` draws one PNG.

    Selects the Agg backend, yields ``plt.subplots(nrows, ncols, **subplots)`` (``figsize``,
    ``sharey``, ``squeeze``...); once the block ends without an error, :func:`save_figure`
    (``tight_layout``, ``savefig`` to ``path`` at ``dpi``). The figure is closed in every
    case: an error in the block leaves no PNG and no open figure. Raises
    :class:`ImportError` without matplotlib."""
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, path, dpi=dpi, tight=tight)
