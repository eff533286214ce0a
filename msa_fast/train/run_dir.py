"""A run directory belongs to one run (contract §7).

``out/`` holds ``run.json`` (the configuration that made it), ``results.json`` and one
``seed_<seed>/`` checkpoint directory per seed. :func:`claim` decides, before any data is
trained on, what a new ``train`` may do with it:

- ``out`` is a file: refused.
- ``out`` holds a run (``run.json``, ``results.json`` or a ``seed_*`` directory) and neither
  ``resume`` nor ``overwrite`` is set: refused, naming both ways on.
- ``overwrite``: the run's own files (those three) are removed; other files are left.
- ``resume``: the stored configuration must equal this one in every key of
  :data:`RESULT_KEYS` (what changes the result); the differing keys are named. ``epochs`` may
  grow (see the trainer: a run stopped by the epoch cap continues, one stopped early does
  not); ``device``, ``backend``, ``progress``, ``threads``, ``num_workers`` may change.
  The data must be the same (:func:`data_identity`: the synthetic spec, or the pickle's
  absolute path, size and content hash) and so must the number of data-parallel ranks;
  ``--allow-data-change`` resumes on changed data (or another world size) deliberately,
  and says so.

A lock file ``out/.lock`` (``fcntl.flock``, holding the owner's pid and host) keeps two
processes from writing one directory: the second gets a :class:`RunDirError` naming the
holder's pid. The kernel drops the lock when its process dies, however it dies, so a lock
left by a killed run never blocks; the stale file is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket

from msa_fast.train.config import TrainConfig

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RESULT_KEYS = ("model", "data", "limit", "seeds", "patience", "batch_size", "lr", "weight_decay",
               "grad_clip", "amp", "missing_rate", "drop_rate", "model_cfg")


_FULL_HASH_BYTES = 256 * 2**20  # hash the whole pickle up to this size, else samples of it
_SAMPLE = 32 * 2**20


def data_identity(spec: str) -> dict:
    """What a run was trained on: ``{"synthetic": spec}`` (the spec fixes the data: preset,
    seed, limit), or for a pickle its absolute path, size and SHA-256 -- of the whole file up
    to 256 MiB, else of its first, middle and last 32 MiB (``"hash": "sampled"``; a
    regenerated pickle differs in all of them), so that a resume on other data is caught."""
    if spec.startswith("synthetic:"):
        return {"synthetic": spec}
    path = os.path.abspath(spec)
    if not os.path.isfile(path):  # the loader says so, in its words, right after
        return {"path": path}
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            for at in (0, size // 2 - _SAMPLE // 2, size - _SAMPLE):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return {"path": path, "size": size, "sha256": h.hexdigest(),
            "hash": "full" if size <= _FULL_HASH_BYTES else "sampled"}


def _identity_diff(stored: dict, now: dict) -> list[str]:
    keys = ("synthetic", "path", "size", "sha256")
    return [f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}" for k in keys if stored.get(k) != now.get(k)]


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def config_diff(stored: dict, cfg: TrainConfig, keys=RESULT_KEYS) -> list[str]:
    """``["lr: stored 0.001, now 0.01", ...]`` over ``keys`` (missing stored keys: defaults)."""
    default = TrainConfig().to_dict()
    now = cfg.to_dict()
    out = []
    for k in keys:
        old = stored.get(k, default[k])
        if k == "data" and _same_data_path(old, now[k]):
            continue
        if _norm(old) != _norm(now[k]):
            out.append(f"{k}: stored {old!r}, now {now[k]!r}")
    return out


def _same_data_path(a, b) -> bool:
    """Two data specs naming one pickle (a run stored before paths were made absolute)."""
    if not (isinstance(a, str) and isinstance(b, str)) or a.startswith("synthetic:") or b.startswith("synthetic:"):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _norm(v):
    """Values equal for the run: ``1`` and ``1.0``, ``[0.2]`` and ``0.2``, tuples and lists."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        v = [_norm(x) for x in v]
        return v[0] if len(v) == 1 else v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def _check_same_data(out: str, cfg: TrainConfig, identity: dict, world: int, log) -> None:
    """A resume continues on the data (``identity``: :func:`data_identity` of ``cfg.data``) and
    the world size it started with (module doc)."""
    stored = _stored_run(out)
    changes = []
    if "data" in stored:  # runs from before data identities: nothing to compare
        changes += _identity_diff(stored["data"], identity)
    if stored.get("world_size", world) != world:
        changes.append(f"data-parallel ranks: stored {stored['world_size']}, now {world}")
    if not changes:
        return
    if not cfg.allow_data_change:
        raise RunDirError(f"--resume: the run in {out} was trained on other data or ranks ({'; '.join(changes)}); "
                          "pass --allow-data-change to continue on these deliberately, or use a new --out")
    log(f"--resume --allow-data-change: continuing {out} although {'; '.join(changes)}")


def holds_run(out: str) -> bool:
    return os.path.isdir(out) and any(
        name in (RUN_FILE, "results.json") or (name.startswith("seed_") and
                                                os.path.isdir(os.path.join(out, name)))
        for name in os.listdir(out))


def stored_config(out: str) -> dict:
    """The configuration of the run in ``out``: ``run.json``, else ``results.json``, else the
    first seed's ``state.json`` (runs written before ``run.json`` existed)."""
    candidates = [os.path.join(out, RUN_FILE), os.path.join(out, "results.json")]
    candidates += sorted(os.path.join(out, d, "state.json") for d in os.listdir(out)
                         if d.startswith("seed_"))
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)["config"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RunDirError(f"{path}: cannot read the stored configuration "
                                  f"({type(e).__name__}: {e}); the file is truncated or corrupt") from None
    return {}


class RunLock:
    """``flock`` on ``out/.lock``; :meth:`acquire` raises :class:`RunDirError` if held."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"out: {os.path.dirname(self.path)} is in use by another msa-fast process "
                f"({holder}; lock file {self.path}); wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _stored_run(out: str) -> dict:
    path = os.path.join(out, RUN_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def claim(cfg: TrainConfig, log=print, world: int = 1):
    """Check, lock and prepare ``cfg.out`` for this run (module doc); yields the lock.
    ``world``: the number of data-parallel ranks of this run."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirError(f"out (--out): {out} is a file, expected a run directory")
    if cfg.resume and cfg.overwrite:
        raise RunDirError("--resume and --overwrite exclude each other (continue the run in "
                          f"{out}, or replace it)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"out (--out): cannot create the run directory {out} "
                          f"({e.strerror or type(e).__name__})") from None
    lock = RunLock(out).acquire()
    try:
        identity = data_identity(cfg.data)  # hashes the pickle: once, for the check and run.json
        if holds_run(out):
            if cfg.overwrite:
                for name in os.listdir(out):
                    path = os.path.join(out, name)
                    if name.startswith("seed_") and os.path.isdir(path):
                        shutil.rmtree(path)
                    elif name in (RUN_FILE, "results.json"):
                        os.unlink(path)
                log(f"--overwrite: removed the earlier run in {out}")
            elif not cfg.resume:
                stored = stored_config(out)
                what = (f" ({stored.get('model')} on {stored.get('data')})" if stored else "")
                raise RunDirError(f"out: {out} already holds a run{what}; pass --resume to "
                                  f"continue it or --overwrite to replace it")
            else:
                diff = config_diff(stored_config(out), cfg)
                if diff:
                    raise RunDirError(
                        f"--resume: the configuration differs from the run in {out} in "
                        f"{len(diff)} key(s) that change the result: {'; '.join(diff)} "
                        f"(use a new --out, or --overwrite)")
                _check_same_data(out, cfg, identity, world, log)
        elif cfg.resume:
            log(f"--resume: no run in {out} yet; starting one")
        from msa_fast.train.checkpoint import save_json

        save_json(os.path.join(out, RUN_FILE), {"config": cfg.to_dict(), "data": identity,
                                                "world_size": world})
        yield lock
    finally:
        lock.release()
