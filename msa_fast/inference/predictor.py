"""Low-latency batched prediction: :class:`Predictor` (contract §7, inference).

``Predictor.predict(samples)`` takes

- a loader batch dict (:func:`msa_fast.data.loader.gather_batch` layout: masks True = padding),
- a list of per-sample dicts ``{"text": (Lt, 768) | "text_bert": (3, Lt), "audio": (La, da),
  "vision": (Lv, dv)}`` (arrays, tensors or nested lists; any lengths; a modality may be
  absent), or
- an MMSA split (:class:`~msa_fast.data.mmsa.SplitData`),

and returns the predictions ``(B,)`` float32 on the CPU, equal to ``model.eval()`` on the same
padded inputs (fp32: within 1e-5).

Numeric and layout choices:

- **Buckets.** Every chunk of at most ``max_batch`` rows is padded to a power-of-two batch
  bucket (pad rows: zeros of length 1, dropped from the result) and each modality to the
  smallest length bucket (``length_buckets``, default the powers of two 8 .. 512 and MMSA's
  padded lengths 50, 375, 500) that holds
  it (pad: zeros, mask True); aligned input (every modality padded to one length) gets one
  common length bucket, so that it stays aligned. So one compiled graph / CUDA graph serves each
  ``(batch, text, audio, vision)`` bucket and nothing recompiles per request. A chunk longer
  than the largest bucket runs eagerly at its own shape. Models are per-sample in eval mode
  (no batch statistics) and mask their padding, so the bucket a sample lands in does not change
  its prediction beyond 1e-5 (tested for every registered model; for FD-CMDIE on aligned data
  only: on unaligned data its concatenated global feature ``G`` takes sinusoidal positions
  over the padded steps, so padding text or audio shifts the positions of what follows, in
  ``model.eval()`` and in a training batch alike). The layout reaches the model as
  ``batch["aligned"]``: unaligned data padded to three equal buckets stays unaligned.
- **A missing modality** in a per-sample dict is what the drop protocol
  (:func:`msa_fast.data.missing.apply_modality_drop`) makes of it: zeros (``text_bert``: [UNK]
  ids between CLS and SEP) of the length of the sample's longest present modality (so aligned
  samples stay aligned), valid under the mask, and ``present[b, m] = False``.
- **LSTM encoders** (:class:`~msa_fast.models.encoders.SLSTMEncoder`, unidirectional) run
  on the padded batch, as the encoder itself does (an LSTM is causal: the valid steps equal
  the packed run's), but in the Predictor's copy of the model through the registered op
  :func:`msa_fast.ops.lstm.lstm` rather than the ``nn.LSTM`` module, which dynamo will
  not trace, so that the whole forward compiles into one graph, can be captured in a CUDA
  graph and exports to ONNX with dynamic batch and lengths.
- **Runtimes** (``runtime=``, :mod:`msa_fast.inference.runtimes`): on the CPU ``"auto"`` picks
  per model and batch bucket the runtime ``benchmarks/models/bench_inference.py`` measured fastest
  (:data:`~msa_fast.inference.runtimes.AUTO_CPU`): ONNX Runtime on the exported graph where
  the ``[onnx]`` extra is installed and it wins, else ``torch.compile(dynamic=False)`` for the
  models in :data:`COMPILE_DEFAULT` (no freezing: at batch 64 it made FD-CMDIE slower, 132 vs
  114 ms, and at batch 1 it changed nothing), else eager. An exported runtime is built on the
  first bucket that needs it (export + check against eager, seconds) and falls back to the
  torch runtime when it cannot be built or run; a compile failure sends that bucket alone to
  eager. Every fallback is counted in ``fallbacks``, logged on ``msa_fast.inference`` and
  warned once.
- **Collation is numpy** (validation, bucketing and padding cost ~30 us a call at batch 1,
  measured by ``bench_inference.py``'s ``predictor_overhead`` rows with a model that returns
  zeros): every input of a bucket reaches the runtime as a fresh contiguous array / tensor
  with row-major strides, so compiled graphs never recompile between padded and unpadded
  requests.
- **CUDA:** one CUDA graph per bucket, captured lazily on its first use with static input
  buffers that are reused on every replay; eager outside the buckets or where capture fails
  (one warning). All graphs of a Predictor are captured and replayed on one persistent side
  stream of its device, share one memory pool (``torch.cuda.graph_pool_handle``), and at most
  ``max_graphs`` (default :data:`MAX_GRAPHS`) stay captured: the least recently used is
  dropped past that (:class:`GraphCache`). Replays are serialised by a lock: concurrent
  ``predict`` calls share the static buffers, and the shared pool is safe only because no
  two graphs run at once and each output is cloned before the next replay. fp32 models are
  captured with TF32 off (``_full_fp32``, restored afterwards; a replay runs the kernels
  chosen at capture), so a graph equals the eager model run at full fp32 precision within
  1e-5; eager with TF32 on may differ by TF32's ~1e-3. ``graphs_captured`` counts captures.

Everything runs under ``torch.inference_mode()``: no autograd state is kept.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import os
import threading
import types
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from msa_fast._backend import get_backend, use_backend
from msa_fast.metrics import warn_if_implausible

_LOG = logging.getLogger("msa_fast.inference")
MODALITIES = ("text", "audio", "vision")
CLS_ID, SEP_ID, UNK_ID = 101, 102, 100
# powers of two, plus MMSA's padded lengths (aligned 50; unaligned MOSI audio 375, vision and
# MOSEI 500), so that a batch of MMSA data (cut to its longest sample) pads at most to the
# data's own length and full-length batches pay no padding at all
DEFAULT_LENGTH_BUCKETS = (8, 16, 32, 50, 64, 128, 256, 375, 500, 512)

# Per-model CPU default of ``compile="auto"``, from benchmarks/results/inference_cpu*.json (1
# thread, providers interleaved): compiled p50 / eager p50 at batch 1 on MOSI aligned 0.39
# (agfn), 0.39 (fd_cmdie), 0.25 (promma), and the compiled Predictor faster at every aligned
# shape and batch and at unaligned batch 8 / 64; lf_dnn and text_only are so small that padding
# and checks cost about what compiling saves (0.85-1.1x lf_dnn, 1.2-2.1x text_only), so they
# stay eager (and skip a 5-40 s compile). A model not listed: eager.
COMPILE_DEFAULT = {"agfn": True, "fd_cmdie": True, "promma": True, "lf_dnn": False,
                   "text_only": False}

MAX_GRAPHS = 64  # CUDA graphs a Predictor keeps captured (LRU): 7 batch x 10^3 length buckets exist


class GraphCache:
    """A least-recently-used map of at most ``max_size`` entries (the Predictor's CUDA graphs).

    :meth:`get` marks an entry used; :meth:`put` adds one and returns the entries it evicted
    (oldest first), so that the caller can release them. Not thread-safe by itself: the
    Predictor holds its lock around every use."""

    def __init__(self, max_size: int):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_graphs: expected a positive integer, got {max_size!r}")
        self.max_size = max_size
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.evictions = 0

    def get(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key, value) -> list:
        self._entries[key] = value
        self._entries.move_to_end(key)
        evicted = []
        while len(self._entries) > self.max_size:
            evicted.append(self._entries.popitem(last=False))
        self.evictions += len(evicted)
        return evicted

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()


@contextlib.contextmanager
def _full_fp32(enabled: bool = True):
    """TF32 off for cuBLAS matmuls and cuDNN (the LSTMs) inside, the previous settings restored
    after. A CUDA graph bakes in the kernels chosen at capture, so an fp32 graph captured
    under TF32 would stay a TF32 graph; captured here, it equals eager fp32 within 1e-5."""
    if not enabled:
        yield
        return
    matmul = torch.get_float32_matmul_precision()  # "high" / "medium" allow TF32 (and bf16)
    cudnn = torch.backends.cudnn
    torch.set_float32_matmul_precision("highest")
    try:
        # cudnn.flags sets every flag it takes: the current ones are passed through
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# -- LSTM without packing -------------------------------------------------------------------

def unpack_lstms(model: nn.Module) -> int:
    """Switch every unidirectional SLSTMEncoder of ``model`` (in place; LSTMs with biases and
    no projection, as the encoder builds them) to the registered op ``msa_fast::lstm``
    (:meth:`~msa_fast.models.encoders.SLSTMEncoder.use_inference_op`); returns how many were
    switched."""
    from msa_fast.models.encoders import SLSTMEncoder

    return sum(mod.use_inference_op() for mod in model.modules() if isinstance(mod, SLSTMEncoder))


# -- sample validation and collation (numpy: a few microseconds a sample) ------------------

_INT_KINDS = "iub"  # numpy kinds accepted as numbers: signed, unsigned (bool is refused below)


def _finite(a: np.ndarray) -> bool:
    """Whether every element of float32 ``a`` is finite; a large one through its sum first: NaN and inf
    propagate into a sum (inf - inf is NaN), so a finite sum proves every element finite with
    one vectorised pass and no bool temporary of ``a``'s size; only a non-finite sum (a bad
    element, or an overflow of huge finite values) pays the exact check. Large arrays sum in
    torch, on torch's intra-op threads: numpy's dot would run on OpenBLAS's own thread pool,
    whose spinning threads then compete with the model's (measured: a batch-64 Predictor call
    of lf_dnn 2x slower)."""
    if a.size <= 2048:  # tiny: the sum, one direct ufunc call
        return math.isfinite(np.add.reduce(a, axis=None)) or bool(np.isfinite(a).all())
    if a.size <= 1 << 16:  # small: the exact check's temporary is cheap (4 us for 50 x 768)
        return bool(np.logical_and.reduce(np.isfinite(a), axis=None))
    t = torch.from_numpy(a)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _np(value) -> np.ndarray:
    """``value`` (an array, a tensor on any device, nested lists) as a numpy array, without a
    copy where it already is one on the CPU."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        try:  # the common case: a CPU tensor of a numpy dtype, no grad
            return value.numpy()
        except (RuntimeError, TypeError):
            t = value.detach().cpu()
            return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    return np.asarray(value)


def _as_float(value, where: str, width: int, lead: str = "L") -> np.ndarray:
    try:
        a = _np(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected numbers of shape ({lead}, {width}), got a "
                         f"non-numeric value ({e})") from None
    if a.dtype != np.float32:
        if a.dtype.kind not in "f" + _INT_KINDS or a.dtype.kind == "b":
            if a.dtype.kind in "OUS":
                raise ValueError(f"{where}: expected numbers of shape ({lead}, {width}), got a "
                                 f"non-numeric value (dtype {a.dtype})")
            raise ValueError(f"{where}: expected a float tensor ({lead}, {width}), got dtype {a.dtype}")
        a = a.astype(np.float32)
    if a.ndim != 2:
        raise ValueError(f"{where}: expected rank 2 ({lead}, {width}), got shape {tuple(a.shape)}")
    if a.shape[1] != width or a.shape[0] < 1:
        raise ValueError(f"{where}: expected shape ({lead}, {width}) with {lead} >= 1, got "
                         f"{tuple(a.shape)}")
    if not _finite(a):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{where}: expected finite values, got {a[bad[0], bad[1]]} at "
                         f"position {tuple(int(i) for i in bad)}")
    return a


def _as_bert(value, where: str) -> np.ndarray:
    try:
        a = _np(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected integer ids of shape (3, Lt), got a non-numeric value "
                         f"({e})") from None
    if a.ndim != 2 or a.shape[0] != 3 or a.shape[1] < 1:
        raise ValueError(f"{where}: expected shape (3, Lt) (ids, mask, segments), got "
                         f"{tuple(a.shape)}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ValueError(f"{where}: expected integer ids, got non-integer values")
    elif a.dtype.kind not in _INT_KINDS or a.dtype.kind == "b":
        raise ValueError(f"{where}: expected integer ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_dims(dims: Mapping) -> dict:
    return {"text": int(dims.get("text", 768)), "audio": int(dims["audio"]),
            "vision": int(dims["vision"]), "text_input": dims.get("text_input", "features")}


def _sample_rows(samples: Sequence, dims: dict) -> list[dict]:
    """Validated per-sample arrays: ``[{"text" | "audio" | "vision": array}]``."""
    bert = dims["text_input"] == "bert"
    text_key = "text_bert" if bert else "text"
    other_text = "text" if bert else "text_bert"
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty list")
    rows = []
    for i, s in enumerate(samples):
        if type(s) is not dict and not isinstance(s, Mapping):
            raise ValueError(f"samples[{i}]: expected a dict of modalities, got {type(s).__name__}")
        if s.get(other_text) is not None and text_key not in s:
            raise ValueError(f"samples[{i}].{other_text}: this model takes {text_key!r} "
                             f"(text_input {dims['text_input']!r}), got {other_text!r}")
        row = {}
        if s.get(text_key) is not None:
            row["text"] = (_as_bert(s[text_key], f"samples[{i}].text_bert") if bert
                           else _as_float(s[text_key], f"samples[{i}].text", dims["text"], "Lt"))
        for m, lead in (("audio", "La"), ("vision", "Lv")):
            if s.get(m) is not None:
                row[m] = _as_float(s[m], f"samples[{i}].{m}", dims[m], lead)
        if not row:
            raise ValueError(f"samples[{i}]: expected at least one of {text_key!r}, 'audio', "
                             f"'vision', got keys {sorted(s)}")
        rows.append(row)
    return rows


def _row_lengths(rows: list[dict], bert: bool) -> tuple[list[list[int]], list[list[bool]]]:
    """Per row, the lengths ``[Lt, La, Lv]`` and ``present`` flags of validated rows (plain
    lists: at batch 1, numpy's per-element access costs more than the arithmetic); a missing
    modality gets the length of the row's longest present one (text_bert: at least 2, CLS and
    SEP)."""
    lens, pres = [], []
    for row in rows:
        got = [(row[m].shape[1] if (m == "text" and bert) else row[m].shape[0]) if m in row else 0
               for m in MODALITIES]
        if 0 in got:
            longest = max(got)
            pres.append([g > 0 for g in got])
            got = [g or max(longest, 2 if (mi == 0 and bert) else 1) for mi, g in enumerate(got)]
        else:
            pres.append([True, True, True])
        lens.append(got)
    return lens, pres


def _fill_rows(rows: list[dict], lengths: list[list[int]], present: list[list[bool]], dims: dict,
               Bp: int, Ls: Sequence[int]) -> dict:
    """The padded numpy batch (``Bp`` rows, lengths ``Ls``) of validated rows, every array
    contiguous (a lone sample already at the bucket's shape: a view of it, no copy); pad rows
    are zeros, valid at position 0."""
    bert = dims["text_input"] == "bert"
    B = len(rows)
    out = {}
    Ls = [int(x) for x in Ls]
    full = B == Bp and all(row == Ls for row in lengths)
    if full:  # no padding: one allocation for the three (all-False) masks
        masks = np.zeros((3, Bp, Ls[0]), bool) if Ls[0] == Ls[1] == Ls[2] else \
            [np.zeros((Bp, L), bool) for L in Ls]
    for mi, m in enumerate(MODALITIES):
        L = Ls[mi]
        key = "text_bert" if (m == "text" and bert) else m
        if full and B == 1 and present[0][mi]:
            # reshape, not [None]: numpy gives a new axis stride 0, which a compiled
            # graph's stride guards tell apart from a padded array's
            x = rows[0][m]
            out[key] = (x if x.flags.c_contiguous else np.ascontiguousarray(x)).reshape(1, *x.shape)
        elif key == "text_bert":
            t = np.zeros((Bp, 3, L), np.int64)
            for b, row in enumerate(rows):
                n = lengths[b][mi]
                if present[b][mi]:
                    t[b, :, :n] = row["text"]
                else:  # the drop protocol's removed text: [UNK] between CLS and SEP
                    t[b, 0, :n] = UNK_ID
                    t[b, 0, 0], t[b, 0, n - 1] = CLS_ID, SEP_ID
                    t[b, 1, :n] = 1
            out[key] = t
        else:
            t = np.zeros((Bp, L, dims[m]), np.float32)
            for b, row in enumerate(rows):
                if present[b][mi]:
                    t[b, : row[m].shape[0]] = row[m]
            out[key] = t
        if full:
            out[f"{m}_mask"] = masks[mi]
        else:
            lens = np.ones(Bp, np.int64)
            lens[:B] = [row[mi] for row in lengths]
            out[f"{m}_mask"] = np.arange(L)[None, :] >= lens[:, None]
    if not all(all(p) for p in present):
        pres = np.ones((Bp, 3), bool)
        pres[:B] = present
        out["present"] = pres
    return out


def collate_samples(samples: Sequence[Mapping], dims: Mapping) -> dict:
    """A batch dict (loader layout, torch tensors, cut to the longest sample per modality) of
    per-sample dicts.

    Raises ``ValueError`` naming ``samples[i].<field>`` for a wrong rank or width, NaN/inf,
    a non-numeric value, a sample with no modality, or one that is not a dict."""
    dims = _check_dims(dims)
    rows = _sample_rows(samples, dims)
    lengths, present = _row_lengths(rows, dims["text_input"] == "bert")
    out = _fill_rows(rows, lengths, present, dims, len(rows), [max(col) for col in zip(*lengths)])
    out.setdefault("present", np.array(present, bool))
    for mi, m in enumerate(MODALITIES):
        out[f"{m}_lengths"] = np.array([row[mi] for row in lengths], np.int64)
    return {k: torch.from_numpy(v) for k, v in out.items()}


_BATCH_KEYS = ("audio", "vision", "text_mask", "audio_mask", "vision_mask")


def _check_batch(batch: Mapping, dims: Mapping) -> dict:
    """The loader batch dict ``batch`` as validated numpy arrays (views where possible)."""
    dims = _check_dims(dims)
    text_key = "text_bert" if dims["text_input"] == "bert" else "text"
    for k in (text_key, *_BATCH_KEYS):
        if k not in batch:
            raise ValueError(f"batch.{k}: missing (a loader batch dict needs {text_key}, "
                             f"{', '.join(_BATCH_KEYS)})")
    out = {}
    B = None
    for m in MODALITIES:
        key = text_key if m == "text" else m
        x = _np(batch[key])
        mask = _np(batch[f"{m}_mask"])
        if m == "text" and text_key == "text_bert":
            if x.ndim != 3 or x.shape[1] != 3:
                raise ValueError(f"batch.text_bert: expected (B, 3, Lt), got {tuple(x.shape)}")
            x = x.astype(np.int64, copy=False)
            L = x.shape[2]
        else:
            if x.ndim != 3 or x.shape[2] != dims[m]:
                raise ValueError(f"batch.{m}: expected (B, L, {dims[m]}), got {tuple(x.shape)}")
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            if not _finite(x):
                raise ValueError(f"batch.{m}: expected finite values, got NaN or inf")
            L = x.shape[1]
        if B is None:
            B = x.shape[0]
        if x.shape[0] != B:
            raise ValueError(f"batch.{key}: expected batch {B}, got {x.shape[0]}")
        if mask.dtype != np.bool_ or tuple(mask.shape) != (B, L):
            raise ValueError(f"batch.{m}_mask: expected bool ({B}, {L}), got "
                             f"{getattr(batch[f'{m}_mask'], 'dtype', mask.dtype)} {tuple(mask.shape)}")
        out[key], out[f"{m}_mask"] = x, mask
    if batch.get("present") is not None:
        pres = _np(batch["present"])
        if tuple(pres.shape) != (B, 3):
            raise ValueError(f"batch.present: expected ({B}, 3), got {tuple(pres.shape)}")
        out["present"] = pres.astype(bool, copy=False)
    return out


def _seq_dim(key: str) -> int:
    return 2 if key == "text_bert" else 1


_ROW_MAJOR: dict = {}


def _canonical(a: np.ndarray) -> np.ndarray:
    """``a`` contiguous with the row-major strides of its shape: numpy leaves any stride on a
    size-1 axis (a new axis has stride 0), and a compiled graph guards on every stride."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if 1 not in a.shape:  # a contiguous array's strides are row-major but on size-1 axes
        return a
    key = (a.shape, a.itemsize)
    want = _ROW_MAJOR.get(key)
    if want is None:
        strides, step = [], a.itemsize
        for n in reversed(a.shape):
            strides.append(step)
            step *= n
        want = _ROW_MAJOR[key] = tuple(reversed(strides))
    return a if a.strides == want else np.lib.stride_tricks.as_strided(a, a.shape, want)


def _pad_rows(batch: dict, rows: slice, Bp: int, Ls: Sequence[int]) -> dict:
    """Rows ``rows`` of the numpy batch ``batch`` padded to ``Bp`` rows and lengths ``Ls``
    (cut where the rows' own length is longer; padding: zeros, mask True, pad rows valid at
    position 0). Every array is contiguous; one already at the bucket's shape is a view."""
    out = {}
    n = rows.stop - rows.start
    for mi, m in enumerate(MODALITIES):
        L = int(Ls[mi])
        k = "text_bert" if (m == "text" and "text_bert" in batch) else m
        x = batch[k][rows]
        d = _seq_dim(k)
        if x.shape[d] > L:
            x = x[:, :, :L] if d == 2 else x[:, :L]
        if x.shape[0] != Bp or x.shape[d] != L:
            shape = list(x.shape)
            shape[0], shape[d] = Bp, L
            y = np.zeros(shape, x.dtype)
            if d == 1:
                y[:n, : x.shape[1]] = x
            else:
                y[:n, :, : x.shape[2]] = x
            x = y
        out[k] = _canonical(x)
        mask = batch[f"{m}_mask"][rows]
        if mask.shape[1] != L or Bp != n:
            full = np.ones((Bp, L), bool)
            full[n:, 0] = False
            w = min(L, mask.shape[1])
            full[:n, :w] = mask[:, :w]
            mask = full
        out[f"{m}_mask"] = _canonical(mask)
    pres = batch.get("present")
    if pres is not None and not pres[rows].all():
        # only where a modality is missing: every model reads an absent "present" as all
        # present, so the common case skips the masking work that "present" costs
        full = np.ones((Bp, 3), bool)
        full[:n] = pres[rows]
        out["present"] = full
    return out


def _batch_lengths(batch: Mapping, rows: slice) -> list[int]:
    """The longest valid length per modality among ``rows`` of the numpy batch (at least 1)."""
    out = []
    for m in MODALITIES:
        mask = batch[f"{m}_mask"][rows]
        if not (mask[0, -1] if mask.shape[0] == 1 else mask[:, -1].all()):  # common: a full row
            out.append(mask.shape[1])
            continue
        nz = np.flatnonzero((~mask).any(0))
        out.append(int(nz[-1]) + 1 if nz.size else 1)
    return out


def _is_split(obj) -> bool:
    from msa_fast.data.mmsa import SplitData

    return isinstance(obj, SplitData)


# -- the Predictor --------------------------------------------------------------------------

class Predictor:
    """Batched, bucketed inference of one model (see the module docstring).

    ``Predictor(model, dims, device="auto", backend="auto", max_batch=64, compile="auto",
    runtime="auto", cuda_graphs=True, length_buckets=DEFAULT_LENGTH_BUCKETS, model_name=None)``;
    most users call :meth:`from_checkpoint`.

    ``runtime`` (:mod:`msa_fast.inference.runtimes`): ``"auto"`` (CPU: per model and batch
    bucket, the runtime measured fastest; CUDA: CUDA graphs), ``"eager"``, ``"compiled"``,
    ``"onnxruntime"`` or ``"aoti"``. ``compile``: the older switch, ``True`` = ``"compiled"``,
    ``False`` = ``"eager"``, ``"auto"`` = let ``runtime`` decide. On CUDA with
    ``cuda_graphs=True`` the graphs run the eager model and ``"compiled"`` is not applied
    (one ``UserWarning`` says so: torch.compile's own graphs are not captured inside the
    Predictor's); with ``cuda_graphs=False`` it is honoured (``torch.compile`` of the model).
    ``max_graphs``: CUDA graphs kept captured (LRU, default :data:`MAX_GRAPHS`);
    ``graphs_captured`` counts captures. ``fallbacks`` counts every runtime that could not
    run a bucket (each also logged on ``msa_fast.inference``)."""

    def __init__(self, model: nn.Module, dims: Mapping, *, device="auto", backend: str = "auto",
                 max_batch: int = 64, compile="auto", runtime: str = "auto",
                 cuda_graphs: bool = True, length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                 model_name: str | None = None, max_graphs: int = MAX_GRAPHS):
        from msa_fast._backend import _check_name
        from msa_fast.inference.runtimes import check_runtime
        from msa_fast.train.trainer import resolve_device

        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {max_batch!r}")
        if compile not in ("auto", True, False):
            raise ValueError(f"compile: expected 'auto', True or False, got {compile!r}")
        runtime = check_runtime(runtime)
        if compile != "auto":
            implied = "compiled" if compile else "eager"
            if runtime not in ("auto", implied):
                raise ValueError(f"compile: compile={compile!r} means runtime {implied!r}, but "
                                 f"runtime={runtime!r} was given; pass one of them")
            runtime = implied
        buckets = sorted({int(b) for b in length_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"length_buckets: expected positive lengths, got {list(length_buckets)}")
        self.backend = _check_name(backend)
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if self.device.type != "cpu" and runtime in ("onnxruntime", "aoti"):
            raise ValueError(f"runtime: {runtime!r} runs on the CPU here, got device {self.device}")
        self.dims = _check_dims(dims)
        self.max_batch = max_batch
        top = _next_pow2(max_batch)
        self.batch_buckets = tuple(1 << i for i in range(top.bit_length()))
        self.length_buckets = tuple(buckets)
        self.model_name = model_name
        self.state: dict | None = None  # the run's state.json (from_checkpoint)
        self.run = None  # the checkpoint.Run read (from_checkpoint), its model left out
        self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        unpack_lstms(self.model)
        self.runtime = runtime
        # the torch runtime of "auto", and of an exported runtime that cannot be built
        self.torch_runtime = runtime if runtime in ("eager", "compiled") else \
            ("compiled" if COMPILE_DEFAULT.get(model_name or "", False) else "eager")
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # torch.compile where the torch runtime is "compiled": on the CPU; on CUDA only when asked
        # for explicitly and without CUDA graphs
        self.compile = self.torch_runtime == "compiled" and (
            self.device.type == "cpu" or (runtime == "compiled" and not self.cuda_graphs))
        if self.cuda_graphs and runtime == "compiled":
            warnings.warn("Predictor: compile=True / runtime='compiled' is not applied on CUDA with "
                          "cuda_graphs=True: the CUDA graphs capture the eager model (torch.compile's "
                          "own CUDA graphs are not captured inside them); pass cuda_graphs=False to "
                          "run torch.compile", UserWarning, stacklevel=2)
        self._compiled = None
        self._compiled_keys: set[tuple] = set()
        # buckets whose compile failed: eager from then on (counted in ``fallbacks``), the
        # other buckets stay compiled
        self._eager_keys: set[tuple] = set()
        self.fallbacks: collections.Counter = collections.Counter()
        self._graphs = GraphCache(max_graphs)
        self.graphs_captured = 0  # CUDA graphs really captured (evicted ones included)
        self._graph_lock = threading.Lock()
        self._graph_stream = None  # torch.cuda.Stream on self.device, made on the first capture
        self._graph_pool = None  # one torch.cuda.graph_pool_handle() for all of them
        self._fp32 = all(p.dtype == torch.float32 for p in self.model.parameters())
        self._warned: set = set()
        self._exported: dict = {}  # (runtime, aligned, present) -> runner, or None where it failed
        self._exported_failed: set = set()  # (runtime, aligned): on torch, bucket-padded
        self._runtime_of: dict = {}  # batch bucket -> runtime
        self._ones3: dict = {}
        self._aoti_dir = None
        self._bucket_cache: dict = {}
        self._full_lengths: dict = {}

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, run_dir: str, device="auto", backend: str = "auto",
                        weights: str = "best", max_batch: int = 64, *, model: str | None = None,
                        **kwargs) -> Predictor:
        """The Predictor of a run directory (``out/seed_<seed>``: ``state.json`` and
        ``best.safetensors`` or the last epoch's weights). ``model``: the model name the
        caller expects (a checkpoint of another model raises ``ValueError``). The run is read
        by the one run loader, :func:`msa_fast.train.checkpoint.load_run` (its ``Run`` is
        kept as ``self.run``, less the model; ``self.state`` is its ``state.json``)."""
        from msa_fast.train.checkpoint import load_run

        run = load_run(run_dir, weights, device="cpu", model=model)  # one-line ValueError naming the path
        p = cls(run.model, run.dims, device=device, backend=backend, max_batch=max_batch,
                model_name=run.model_name, **kwargs)
        p.state = run.state
        p.run = dataclasses.replace(run, model=None)
        return p

    # -- public ------------------------------------------------------------------------

    def predict(self, samples) -> torch.Tensor:
        """Predictions ``(B,)`` float32 on the CPU for a batch dict, a list of sample dicts or a
        SplitData (see the module docstring)."""
        if type(samples) is list:  # the serving case first: no ABC checks
            pred = self._predict_samples(samples)
        elif isinstance(samples, Mapping):
            batch = _check_batch(samples, self.dims)
            n = batch["audio"].shape[0]
            if n == 0:
                raise ValueError("samples: expected at least one sample, got a batch of 0")
            pred = self._predict_batch(batch, n)
        elif _is_split(samples):
            pred = self._predict_split(samples)
        elif isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
            pred = self._predict_samples(samples)
        else:
            raise ValueError(f"samples: expected a batch dict, a list of sample dicts or a "
                             f"SplitData, got {type(samples).__name__}")
        warn_if_implausible(pred, (self.state or {}).get("label_absmax"),
                            f"Predictor of {self.model_name or type(self.model).__name__}")
        return torch.from_numpy(pred)

    def bucket_of(self, n: int, lengths) -> tuple | None:
        """``(batch, Lt, La, Lv)`` bucket of ``n <= max_batch`` rows with these longest lengths
        (a mapping by modality or a sequence in text, audio, vision order), or None when a
        length exceeds the largest bucket (eager at its own shape)."""
        if isinstance(lengths, Mapping):
            lengths = [lengths[m] for m in MODALITIES]
        cache = self._bucket_cache
        key = (n, *lengths)
        hit = cache.get(key)
        if hit is None and key not in cache:
            Ls = [next((lb for lb in self.length_buckets if lb >= want), None) for want in lengths]
            hit = None if None in Ls else (next(b for b in self.batch_buckets if b >= n), *Ls)
            if len(cache) < 65536:
                cache[key] = hit
        return hit

    def runtime_for(self, batch_bucket: int) -> str:
        """The runtime a bucket of ``batch_bucket`` rows runs with (before any fallback):
        ``"cuda_graphs"`` on CUDA, else one of :data:`~msa_fast.inference.runtimes.RUNTIMES`."""
        rt = self._runtime_of.get(batch_bucket)
        if rt is None:
            if self.device.type != "cpu":
                rt = "cuda_graphs" if self.cuda_graphs else ("compiled" if self.compile else "eager")
            elif self.runtime == "auto":
                from msa_fast.inference.runtimes import auto_runtime

                rt = auto_runtime(self.model_name, batch_bucket, self.torch_runtime)
            else:
                rt = self.runtime
            self._runtime_of[batch_bucket] = rt
        return rt

    def export_inputs(self, split, n: int) -> tuple[bool, tuple[torch.Tensor, ...]]:
        """``(aligned, inputs)``: the first ``n`` samples of ``split`` as the exported graph's
        inputs (:func:`msa_fast.inference.export.input_names` order), padded to the bucket
        the Predictor runs them in."""
        from msa_fast.data.loader import gather_batch
        from msa_fast.inference.export import input_names

        batch = _check_batch(gather_batch(split, torch.arange(min(n, len(split)))), self.dims)
        k = batch["audio"].shape[0]
        aligned, lengths, key = self._bucket(batch, slice(0, k), k)
        if key is None:
            key = (k, *lengths)
        padded = _pad_rows(batch, slice(0, k), key[0], key[1:])
        padded.setdefault("present", np.ones((key[0], 3), bool))
        return aligned, tuple(torch.from_numpy(padded[name]) for name in input_names(self.dims))

    # -- internals ---------------------------------------------------------------------

    def _predict_split(self, split) -> np.ndarray:
        from msa_fast.data.loader import gather_batch

        n = len(split)
        if n == 0:
            raise ValueError("samples: expected at least one sample, got an empty split")
        outs = []
        for s in range(0, n, self.max_batch):
            idx = torch.arange(s, min(n, s + self.max_batch))
            b = _check_batch(gather_batch(split, idx), self.dims)
            outs.append(self._predict_batch(b, len(idx)))
        return np.concatenate(outs)

    def _predict_samples(self, samples: Sequence) -> np.ndarray:
        # straight into each chunk's bucket: one allocation and one copy per modality
        rows = _sample_rows(samples, self.dims)
        lengths, present = _row_lengths(rows, self.dims["text_input"] == "bert")
        outs = []
        for s in range(0, len(rows), self.max_batch):
            chunk = slice(s, min(len(rows), s + self.max_batch))
            k = chunk.stop - chunk.start
            longest = lengths[s] if k == 1 else [max(col) for col in zip(*lengths[chunk])]
            aligned = longest[0] == longest[1] == longest[2]
            key = self.bucket_of(k, longest)
            Bp, Ls = (k, longest) if key is None or self._dynamic(key, aligned) else (key[0], key[1:])
            padded = _fill_rows(rows[chunk], lengths[chunk], present[chunk], self.dims, Bp, Ls)
            outs.append(self._run_bucket(key, aligned, padded, k))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _bucket(self, batch: dict, rows: slice, k: int) -> tuple[bool, list[int], tuple | None]:
        """``(aligned, longest lengths, bucket or None)`` of rows ``rows`` of a numpy batch."""
        text_key = "text_bert" if "text_bert" in batch else "text"
        # aligned input (one padded length for every modality) stays aligned: one common
        # length bucket, since a model may read equal lengths as aligned data (FD-CMDIE's
        # global feature 'auto': mean when aligned, concat otherwise)
        aligned = batch[text_key].shape[_seq_dim(text_key)] == batch["audio"].shape[1] == batch["vision"].shape[1]
        lengths = _batch_lengths(batch, rows)
        if aligned:
            lengths = [max(lengths)] * 3
        return aligned, lengths, self.bucket_of(k, lengths)

    def _predict_batch(self, batch: dict, n: int) -> np.ndarray:
        outs = []
        for s in range(0, n, self.max_batch):
            rows = slice(s, min(n, s + self.max_batch))
            k = rows.stop - rows.start
            aligned, lengths, key = self._bucket(batch, rows, k)
            if key is None or self._dynamic(key, aligned):  # eager outside the buckets / a dynamic graph
                padded = _pad_rows(batch, rows, k, lengths)
            else:
                padded = _pad_rows(batch, rows, key[0], key[1:])
            outs.append(self._run_bucket(key, aligned, padded, k))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _dynamic(self, key: tuple, aligned: bool) -> bool:
        """Whether bucket ``key`` runs an exported graph with dynamic batch and lengths (ONNX
        Runtime, AOTInductor), which needs no padding to the bucket: the chunk runs at its own
        batch and longest lengths, as a caller of that runtime would run it."""
        rt = self.runtime_for(key[0])
        return rt in ("onnxruntime", "aoti") and (rt, aligned) not in self._exported_failed

    def _run_bucket(self, key: tuple | None, aligned: bool, padded: dict, k: int) -> np.ndarray:
        """Predictions (float32 numpy) of the first ``k`` rows of a padded numpy batch of
        bucket ``key`` (None: outside the buckets, eager)."""
        rt = "eager" if key is None else self.runtime_for(key[0])
        if rt in ("onnxruntime", "aoti"):
            # _pad_rows / _fill_rows leave "present" out where every row has every modality
            present = rt == "aoti" or "present" in padded
            run = self._exported_runner(rt, aligned, present)
            if run is not None:
                try:
                    return run(padded, padded["audio"].shape[0])[:k]
                except Exception as e:  # noqa: BLE001 - this layout runs on torch from now on
                    self._exported[(rt, aligned, present)] = None
                    self._exported_failed.add((rt, aligned))
                    self._fallback(rt, e)
                    self._warn(rt, e)
            rt = self.torch_runtime
        # fresh tensors over contiguous arrays: every input of a bucket reaches the runtime
        # as the same kind of tensor, so a compiled graph's guards never tell them apart
        batch = {name: torch.from_numpy(v) for name, v in padded.items()}
        for m in MODALITIES:  # the loader layout's lengths, for models that read them
            batch[f"{m}_lengths"] = self._lengths(m, padded[f"{m}_mask"])
        # the layout, which the length buckets can hide: unaligned data padded to three equal
        # buckets is still unaligned (FD-CMDIE reads equal lengths as aligned otherwise)
        batch["aligned"] = aligned
        backend = contextlib.nullcontext() if get_backend() == self.backend else use_backend(self.backend)
        with torch.inference_mode(), backend:
            if key is None or (rt == "eager" and not self.cuda_graphs):
                out = self._eager(batch)
            else:
                # the bucket plus the dict's keys and dtypes: everything a compiled graph or
                # CUDA graph is specialised on besides the bucket's shapes
                sig = tuple((name, getattr(v, "dtype", v)) for name, v in sorted(batch.items()))
                out = self._run((*key, sig), batch)
            if out.shape[0] != k:
                out = out[:k]
            if out.dtype != torch.float32 or out.device.type != "cpu":
                out = out.float().cpu()
            return out.numpy()

    def _exported_runner(self, rt: str, aligned: bool, present: bool):
        """The ONNX Runtime session / AOTInductor package of one layout, built (exported and
        checked against eager) on first use; None where that failed (counted, warned once).
        ONNX Runtime: ``present=False`` is the graph without the ``present`` input, for
        buckets whose rows have every modality (4 % faster for AGFN at batch 1)."""
        key = (rt, aligned, present)
        if key not in self._exported:
            try:
                self._exported[key] = self._build_exported(rt, aligned, present)
            except Exception as e:  # noqa: BLE001 - runs on torch instead, logged and counted
                self._exported[key] = None
                self._exported_failed.add((rt, aligned))
                self._fallback(f"{rt} export", e)
                self._warn(f"{rt} export", e)
        return self._exported[key]

    def _build_exported(self, rt: str, aligned: bool, present: bool):
        import tempfile

        from msa_fast.inference import export as E

        names = E.input_names(self.dims, present)
        common = {"model_name": self.model_name or type(self.model).__name__, "aligned": aligned,
                  "length_buckets": self.length_buckets}
        if rt == "onnxruntime":
            data, _ = E.export_onnx(self.model, self.dims, present=present, **common)
            session = E.ort_session(data, torch.get_num_threads())
            output = [session.get_outputs()[0].name]

            def run_ort(padded: dict, Bp: int) -> np.ndarray:
                return session.run(output, {name: padded[name] for name in names})[0]
            return run_ort
        if self._aoti_dir is None:
            self._aoti_dir = tempfile.TemporaryDirectory(prefix="msa_fast_aoti_")
        path = os.path.join(self._aoti_dir.name, f"{'aligned' if aligned else 'unaligned'}.pt2")
        E.export_aoti(self.model, self.dims, path, **common)
        loaded = torch._inductor.aoti_load_package(path)

        def run_aoti(padded: dict, Bp: int) -> np.ndarray:
            args = [torch.from_numpy(padded[name] if name in padded else self._all_present(Bp))
                    for name in names]
            with torch.inference_mode():
                return loaded(*args).numpy()
        return run_aoti

    def _lengths(self, modality: str, mask: np.ndarray) -> torch.Tensor:
        if mask.any():
            return torch.from_numpy(mask.shape[1] - mask.sum(1))
        # no padding: one shared tensor per modality and shape (per modality: the same tensor
        # as two inputs would be an alias, which a compiled graph's guards tell apart)
        key = (modality, mask.shape)
        full = self._full_lengths.get(key)
        if full is None:
            full = self._full_lengths[key] = torch.full(mask.shape[:1], mask.shape[1])
        return full

    def _all_present(self, Bp: int) -> np.ndarray:
        ones = self._ones3.get(Bp)
        if ones is None:
            ones = self._ones3[Bp] = np.ones((Bp, 3), bool)
        return ones

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _eager(self, batch: dict) -> torch.Tensor:
        if self.device.type != "cpu":
            batch = self._on_device(batch)
        return self.model(batch)["pred"]

    def _fallback(self, what: str, err: BaseException) -> None:
        """Count and log a runtime's fallback (``self.fallbacks[what]``): never silent."""
        self.fallbacks[what] += 1
        _LOG.info("Predictor of %s: %s (%s: %s)", self.model_name or "the model", what,
                  type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def _warn(self, what: str, err: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"Predictor: {what} failed for {self.model_name or 'the model'} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          f"running eagerly", RuntimeWarning, stacklevel=3)

    def _run(self, key: tuple, batch: dict) -> torch.Tensor:
        if self.cuda_graphs:
            try:
                return self._replay(key, batch)
            except Exception as e:  # noqa: BLE001 - any capture failure: eager, once warned
                self.cuda_graphs = False
                self._graphs.clear()
                self._warn("CUDA graph capture", e)
        if self.compile and key not in self._eager_keys:
            fn = self._compiled_fn()
            if self.device.type != "cpu":
                batch = self._on_device(batch)
            try:
                if key in self._compiled_keys:
                    # A bucket compiled before: every input of that bucket has its shapes,
                    # dtypes and devices, and the frozen weights never change, so only the
                    # guards that tell the compiled buckets apart are needed. Full guard
                    # evaluation over the model's parameters costs ~0.5 ms per call on a CPU,
                    # a fifth of a batch-1 forward.
                    try:
                        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                            return fn(batch)
                    except RuntimeError as e:
                        if "skip_guard_eval_unsafe" not in str(e):
                            raise
                        # an input the guards did not expect: count it, compile it with full
                        # guards (below) and keep the compiled runtime
                        self._fallback("recompile", e)
                # first call of this bucket: compiles with the full guards, under a recompile
                # limit for this call only (one graph per bucket: batch buckets x length
                # buckets^3 at most; Dynamo's default of 8 would send the ninth to eager)
                with self._compile_limits():
                    out = fn(batch)
                self._compiled_keys.add(key)
                return out
            except Exception as e:  # noqa: BLE001 - this bucket runs eagerly from now on
                self._eager_keys.add(key)
                self._fallback("torch.compile", e)
                self._warn("torch.compile", e)
        return self._eager(batch)

    @staticmethod
    def _compile_limits():
        """``torch._dynamo.config.patch`` of the recompile limit (its name differs across torch
        versions) for one call: the process-wide setting stays the user's."""
        import torch._dynamo

        cfg = torch._dynamo.config
        limits = {name: max(getattr(cfg, name), 1024) for name in ("recompile_limit", "cache_size_limit")
                  if hasattr(cfg, name)}
        return cfg.patch(**limits)

    def _compiled_fn(self):
        if self._compiled is None:
            model = self.model

            def forward(batch):
                return model(batch)["pred"]

            # One code object per Predictor: Dynamo keeps its compiled graphs on the code
            # object, and with skip_guard_eval_unsafe it checks only the guards that tell the
            # cached graphs apart, which two Predictors of one model share but for the closure's
            # weights (measured: a second compiled ProMMA Predictor in one process hit a guard
            # miss and recompiled).
            code = forward.__code__.replace(co_name=f"predictor_forward_{id(self):x}")
            forward = types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
            self._compiled = torch.compile(forward, dynamic=False)
        return self._compiled

    def _replay(self, key: tuple, batch: dict) -> torch.Tensor:
        """The model's prediction on ``batch`` (CPU tensors of bucket ``key``) by the bucket's
        CUDA graph, captured on its first use. Under the lock: one replay at a time."""
        with self._graph_lock, torch.cuda.device(self.device):
            entry = self._graphs.get(key)
            if entry is None:
                # TF32 off for the capture only: a replay runs the kernels chosen then and
                # reads no flag, and the flags are process-wide (other threads see them)
                with _full_fp32(self._fp32):
                    entry = self._capture(key, batch)
            graph, static, pinned, staged, out = entry
            stream = self._graph_stream
            caller = torch.cuda.current_stream(self.device)
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                staged.synchronize()  # the previous replay's copies out of the pinned buffers are done
                for k, v in batch.items():
                    if torch.is_tensor(v):
                        src = pinned.get(k)
                        if src is not None:
                            src.copy_(v)
                            static[k].copy_(src, non_blocking=True)
                        else:
                            static[k].copy_(v, non_blocking=True)
                staged.record(stream)
                graph.replay()
                result = out.clone()  # before any other graph reuses the shared pool's memory
            caller.wait_stream(stream)
            result.record_stream(caller)
            return result

    def _capture(self, key: tuple, batch: dict) -> tuple:
        """Capture bucket ``key``'s graph on the Predictor's stream and pool (the lock held)."""
        if self._graph_stream is None:
            self._graph_stream = torch.cuda.Stream(device=self.device)
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = self._graph_stream
        static = {k: v.to(self.device).clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        # pinned host staging: the host-to-device copies of a replay run asynchronously
        pinned = {k: torch.empty_like(v, pin_memory=True) for k, v in batch.items()
                  if torch.is_tensor(v) and v.device.type == "cpu"}
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph, on the capture stream (lazy init, cuBLAS workspaces)
                self.model(static)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"):
            out = self.model(static)["pred"]
        self.graphs_captured += 1
        entry = (graph, static, pinned, torch.cuda.Event(), out)
        for _key, old in self._graphs.put(key, entry):
            old[0].reset()  # an evicted graph never replays: release it
        return entry

__all__ = ["COMPILE_DEFAULT", "DEFAULT_LENGTH_BUCKETS", "Predictor", "collate_samples",
           "unpack_lstms"]
