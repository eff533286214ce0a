"""Low-latency batched prediction: :class:`Predictor` (SPEC §7, inference).

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
  its prediction beyond 1e-5 (tested for every registered model).
- **A missing modality** in a per-sample dict is what the drop protocol
  (:func:`msa_fast.data.missing.apply_modality_drop`) makes of it: zeros (``text_bert``: [UNK]
  ids between CLS and SEP) of the length of the sample's longest present modality (so aligned
  samples stay aligned), valid under the mask, and ``present[b, m] = False``.
- **LSTM encoders** (:class:`~msa_fast.models.encoders.SLSTMEncoder`, unidirectional) run
  on the padded batch, as the encoder itself does (an LSTM is causal: the valid steps equal
  the packed run's), but in the Predictor's copy of the model through the registered op
  :func:`msa_fast.inference.lstm.lstm` rather than the ``nn.LSTM`` module, which dynamo will
  not trace, so that the whole forward compiles into one graph, can be captured in a CUDA
  graph and exports to ONNX with dynamic batch and lengths.
- **CPU:** ``compile="auto"`` uses ``torch.compile(dynamic=False)`` (no freezing: at batch 64 it made FD-CMDIE
  slower, 132 vs 114 ms, and at batch 1 it changed nothing) for the models in
  :data:`COMPILE_DEFAULT` (decided by ``benchmarks/bench_inference.py``, see the README); a
  compile failure warns once and falls back to eager.
- **CUDA:** one CUDA graph per bucket, captured lazily on its first use with static input
  buffers that are reused on every replay; eager outside the buckets or where capture fails
  (one warning).

Everything runs under ``torch.inference_mode()``: no autograd state is kept.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import os
import types
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

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

_SAMPLE_KEYS = ("text", "text_bert", "audio", "vision")


def _all_finite(t: torch.Tensor) -> bool:
    """``isfinite(t).all()``, through the sum first: a sum is non-finite whenever an element is
    (NaN / inf propagate, inf - inf is NaN), so a finite sum proves every element finite with
    one vectorised reduction and no (B, L, D) bool temporary; only a non-finite sum (an element,
    or an overflow of large finite values) pays the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# -- LSTM without packing -------------------------------------------------------------------

def _unpacked_slstm_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
    """SLSTMEncoder.forward's padded run (unidirectional), with the LSTM called as the
    registered op :func:`msa_fast.inference.lstm.lstm`: dynamo refuses to trace an ``nn.LSTM``
    module, and the op is one node in every runtime's graph (ONNX's ``LSTM``, ATen's fused
    kernel under torch.compile), hence the weights kept aside by :func:`unpack_lstms`."""
    from msa_fast.inference.lstm import lstm
    from msa_fast.models.encoders import lstm_lengths, valid_outputs

    flat, hidden = self._unpacked_lstm
    return valid_outputs(lstm(x, flat, hidden), lstm_lengths(x, mask))


def unpack_lstms(model: nn.Module) -> int:
    """Switch every unidirectional SLSTMEncoder of ``model`` (in place; LSTMs with biases and
    no projection, as the encoder builds them) to the unpacked forward; returns how many were
    switched."""
    from msa_fast.models.encoders import SLSTMEncoder

    n = 0
    for mod in model.modules():
        if isinstance(mod, SLSTMEncoder):
            lstm = mod.lstm
            if lstm.bidirectional or not lstm.bias or lstm.proj_size:
                continue
            mod._unpacked_lstm = (list(lstm._flat_weights), lstm.hidden_size)
            mod.forward = types.MethodType(_unpacked_slstm_forward, mod)
            n += 1
    return n


# -- sample validation and collation --------------------------------------------------------

def _as_float(value, where: str, width: int, lead: str = "L") -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(value, dtype=np.float32)) if not torch.is_tensor(value) else value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected numbers of shape ({lead}, {width}), got a "
                         f"non-numeric value ({e})") from None
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise ValueError(f"{where}: expected a float tensor ({lead}, {width}), got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.float32)
    if t.dim() != 2:
        raise ValueError(f"{where}: expected rank 2 ({lead}, {width}), got shape {tuple(t.shape)}")
    if t.shape[1] != width or t.shape[0] < 1:
        raise ValueError(f"{where}: expected shape ({lead}, {width}) with {lead} >= 1, got "
                         f"{tuple(t.shape)}")
    if not _all_finite(t):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{where}: expected finite values, got {t[bad[0], bad[1]].item()} at "
                         f"position {tuple(bad)}")
    return t


def _as_bert(value, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value.detach().cpu()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected integer ids of shape (3, Lt), got a non-numeric value "
                         f"({e})") from None
    if t.dim() != 2 or t.shape[0] != 3 or t.shape[1] < 1:
        raise ValueError(f"{where}: expected shape (3, Lt) (ids, mask, segments), got "
                         f"{tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise ValueError(f"{where}: expected integer ids, got non-integer values")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{where}: expected integer ids, got dtype {t.dtype}")
    return t.long()


def _check_dims(dims: Mapping) -> dict:
    return {"text": int(dims.get("text", 768)), "audio": int(dims["audio"]),
            "vision": int(dims["vision"]), "text_input": dims.get("text_input", "features")}


def collate_samples(samples: Sequence[Mapping], dims: Mapping) -> dict:
    """A batch dict (loader layout, cut to the longest sample per modality) of per-sample dicts.

    Raises ``ValueError`` naming ``samples[i].<field>`` for a wrong rank or width, NaN/inf,
    a non-numeric value, a sample with no modality, or one that is not a dict."""
    dims = _check_dims(dims)
    bert = dims["text_input"] == "bert"
    text_key = "text_bert" if bert else "text"
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty list")
    rows = []
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping):
            raise ValueError(f"samples[{i}]: expected a dict of modalities, got {type(s).__name__}")
        other_text = "text" if bert else "text_bert"
        if other_text in s and s[other_text] is not None and text_key not in s:
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
    B = len(rows)
    lengths = {m: torch.ones(B, dtype=torch.long) for m in MODALITIES}
    present = torch.ones(B, 3, dtype=torch.bool)
    for b, row in enumerate(rows):
        seq_len = lambda m, r=row: r[m].shape[1] if (m == "text" and bert) else r[m].shape[0]  # noqa: E731
        longest = max(seq_len(m) for m in row)
        for mi, m in enumerate(MODALITIES):
            if m in row:
                lengths[m][b] = seq_len(m)
            else:
                lengths[m][b] = max(longest, 2 if (m == "text" and bert) else 1)
                present[b, mi] = False
    L = {m: int(lengths[m].max()) for m in MODALITIES}
    batch = {}
    for m in MODALITIES:
        if m == "text" and bert:
            t = torch.zeros(B, 3, L[m], dtype=torch.long)
            for b, row in enumerate(rows):
                n = int(lengths[m][b])
                if "text" in row:
                    t[b, :, :n] = row["text"]
                else:  # the drop protocol's removed text: [UNK] between CLS and SEP
                    t[b, 0, :n] = UNK_ID
                    t[b, 0, 0], t[b, 0, n - 1] = CLS_ID, SEP_ID
                    t[b, 1, :n] = 1
            batch["text_bert"] = t
        else:
            width = dims[m]
            t = torch.zeros(B, L[m], width)
            for b, row in enumerate(rows):
                if m in row:
                    t[b, : row[m].shape[0]] = row[m]
            batch[m] = t
        batch[f"{m}_lengths"] = lengths[m]
        batch[f"{m}_mask"] = torch.arange(L[m])[None, :] >= lengths[m][:, None]
    batch["present"] = present
    return batch


_BATCH_KEYS = ("audio", "vision", "text_mask", "audio_mask", "vision_mask")


def _check_batch(batch: Mapping, dims: Mapping) -> int:
    dims = _check_dims(dims)
    text_key = "text_bert" if dims["text_input"] == "bert" else "text"
    for k in (text_key, *_BATCH_KEYS):
        if k not in batch:
            raise ValueError(f"batch.{k}: missing (a loader batch dict needs {text_key}, "
                             f"{', '.join(_BATCH_KEYS)})")
    B = batch["audio"].shape[0]
    for m in MODALITIES:
        x = batch[text_key] if m == "text" else batch[m]
        mask = batch[f"{m}_mask"]
        if m == "text" and text_key == "text_bert":
            if x.dim() != 3 or x.shape[1] != 3:
                raise ValueError(f"batch.text_bert: expected (B, 3, Lt), got {tuple(x.shape)}")
            L = x.shape[2]
        else:
            if x.dim() != 3 or x.shape[2] != dims[m]:
                raise ValueError(f"batch.{m}: expected (B, L, {dims[m]}), got {tuple(x.shape)}")
            if not _all_finite(x):
                raise ValueError(f"batch.{m}: expected finite values, got NaN or inf")
            L = x.shape[1]
        if x.shape[0] != B:
            raise ValueError(f"batch.{m if m != 'text' else text_key}: expected batch {B}, got "
                             f"{x.shape[0]}")
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
            raise ValueError(f"batch.{m}_mask: expected bool ({B}, {L}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    if "present" in batch and tuple(batch["present"].shape) != (B, 3):
        raise ValueError(f"batch.present: expected ({B}, 3), got {tuple(batch['present'].shape)}")
    return B


def _seq_dim(key: str) -> int:
    return 2 if key == "text_bert" else 1


def _pad_rows(batch: dict, rows: slice, Bp: int, Ls: dict) -> dict:
    """Rows ``rows`` of ``batch`` padded to ``Bp`` rows and lengths ``Ls[m]`` (cut where the
    rows' own length is shorter; padding: zeros, mask True, pad rows valid at position 0)."""
    out = {}
    n = None
    for m in MODALITIES:
        keys = ["text_bert", "text"] if m == "text" else [m]
        for k in keys:
            if k not in batch:
                continue
            x = batch[k][rows]
            n = x.shape[0]
            L = Ls[m]
            d = _seq_dim(k)
            cur = x.shape[d]
            if cur >= L:
                x = x.narrow(d, 0, L)
            shape = list(x.shape)
            shape[0], shape[d] = Bp, L
            if tuple(shape) != tuple(x.shape):
                y = x.new_zeros(shape)
                if d == 1:
                    y[:n, : x.shape[1]] = x
                else:
                    y[:n, :, : x.shape[2]] = x
                x = y
            out[k] = x
        mask = batch[f"{m}_mask"][rows]
        mask = mask[:, :L] if mask.shape[1] >= L else torch.cat(
            [mask, mask.new_ones(mask.shape[0], L - mask.shape[1])], 1)
        if Bp > n:
            pad = mask.new_ones(Bp - n, L)
            pad[:, 0] = False
            mask = torch.cat([mask, pad])
        out[f"{m}_mask"] = mask.contiguous()
        out[f"{m}_lengths"] = (L - mask.sum(1)).long()
    pres = batch.get("present")
    if pres is not None and not bool(pres[rows].all()):
        # only where a modality is missing: every model reads an absent "present" as all
        # present, so the common case skips the masking work that "present" costs
        pres = pres[rows].bool()
        out["present"] = torch.cat([pres, pres.new_ones(Bp - n, 3)]) if Bp > n else pres
    # Every input of a bucket reaches the runtime as the same kind of tensor: fresh,
    # contiguous, made under inference mode. A row already at the bucket's length would
    # otherwise be a (possibly strided) view of the caller's ordinary tensor while a padded
    # one is a new inference tensor, and a compiled graph's guards tell the two apart.
    return {k: v if v.is_inference() and v.is_contiguous() else v.clone(memory_format=torch.contiguous_format)
            for k, v in out.items()}


def _batch_lengths(batch: Mapping, rows: slice) -> dict:
    """The longest valid length per modality among ``rows`` (at least 1)."""
    out = {}
    for m in MODALITIES:
        cols = (~batch[f"{m}_mask"][rows]).any(0)  # (L,): a valid step in some row
        if cols.numel() and bool(cols[-1]):  # the common case: full length, one sync
            out[m] = cols.numel()
            continue
        nz = cols.nonzero()
        out[m] = int(nz[-1]) + 1 if nz.numel() else 1
    return out


# -- the Predictor --------------------------------------------------------------------------

class Predictor:
    """Batched, bucketed inference of one model (see the module docstring).

    ``Predictor(model, dims, device="auto", backend="auto", max_batch=64, compile="auto",
    cuda_graphs=True, length_buckets=DEFAULT_LENGTH_BUCKETS, model_name=None)``; most users
    call :meth:`from_checkpoint`. ``compile``: ``"auto"`` (CPU: :data:`COMPILE_DEFAULT` by
    ``model_name``), True or False; ignored on CUDA, where ``cuda_graphs`` decides."""

    def __init__(self, model: nn.Module, dims: Mapping, *, device="auto", backend: str = "auto",
                 max_batch: int = 64, compile="auto", cuda_graphs: bool = True,
                 length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                 model_name: str | None = None):
        from msa_fast._backend import _check_name
        from msa_fast.train.trainer import resolve_device

        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {max_batch!r}")
        if compile not in ("auto", True, False):
            raise ValueError(f"compile: expected 'auto', True or False, got {compile!r}")
        buckets = sorted({int(b) for b in length_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"length_buckets: expected positive lengths, got {list(length_buckets)}")
        self.backend = _check_name(backend)
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.dims = _check_dims(dims)
        self.max_batch = max_batch
        top = _next_pow2(max_batch)
        self.batch_buckets = tuple(1 << i for i in range(top.bit_length()))
        self.length_buckets = tuple(buckets)
        self.model_name = model_name
        self.state: dict | None = None  # the run's state.json (from_checkpoint)
        self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        unpack_lstms(self.model)
        if compile == "auto":
            compile = COMPILE_DEFAULT.get(model_name or "", False)
        self.compile = bool(compile) and self.device.type == "cpu"
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self._compiled = None
        self._compiled_keys: set[tuple] = set()
        # buckets whose compile failed: eager from then on (counted in ``fallbacks``), the
        # other buckets stay compiled
        self._eager_keys: set[tuple] = set()
        self.fallbacks: collections.Counter = collections.Counter()
        self._graphs: dict = {}
        self._warned: set = set()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, run_dir: str, device="auto", backend: str = "auto",
                        weights: str = "best", max_batch: int = 64, *, model: str | None = None,
                        **kwargs) -> Predictor:
        """The Predictor of a run directory (``out/seed_<seed>``: ``state.json`` and
        ``best.safetensors`` or the last epoch's weights). ``model``: the model name the
        caller expects (a checkpoint of another model raises ``ValueError``)."""
        from msa_fast.models import build_model
        from msa_fast.train.checkpoint import load_weights, read_state

        if weights not in ("best", "last"):
            raise ValueError(f"weights: expected 'best' or 'last', got {weights!r}")
        if not os.path.isfile(os.path.join(run_dir, "state.json")):
            raise ValueError(f"run_dir: no checkpoint in {run_dir} (state.json not found)")
        state = read_state(run_dir)
        if model is not None and state["model"] != model:
            raise ValueError(f"run_dir: expected a checkpoint of model {model!r}, got one of "
                             f"{state['model']!r} ({run_dir})")
        path = os.path.join(run_dir, "best.safetensors" if weights == "best" else state["weights"])
        if not os.path.isfile(path):
            raise ValueError(f"weights: checkpoint weights not found: {path}")
        net = build_model(state["model"], state["dims"], **state["model_cfg"])
        load_weights(path, net)  # CheckpointError (a ValueError) names the file
        p = cls(net, state["dims"], device=device, backend=backend, max_batch=max_batch,
                model_name=state["model"], **kwargs)
        p.state = state
        return p

    # -- public ------------------------------------------------------------------------

    def predict(self, samples) -> torch.Tensor:
        """Predictions ``(B,)`` float32 on the CPU for a batch dict, a list of sample dicts or a
        SplitData (see the module docstring)."""
        from msa_fast.data.mmsa import SplitData

        if isinstance(samples, SplitData):
            return self._predict_split(samples)
        if isinstance(samples, Mapping):
            batch = dict(samples)
            n = _check_batch(batch, self.dims)
        elif isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
            batch = collate_samples(samples, self.dims)
            n = int(batch["present"].shape[0])
        else:
            raise ValueError(f"samples: expected a batch dict, a list of sample dicts or a "
                             f"SplitData, got {type(samples).__name__}")
        if n == 0:
            raise ValueError("samples: expected at least one sample, got a batch of 0")
        return self._predict_batch(batch, n)

    def bucket_of(self, n: int, lengths: Mapping) -> tuple | None:
        """``(batch, Lt, La, Lv)`` bucket of ``n <= max_batch`` rows with these longest lengths,
        or None when a length exceeds the largest bucket (eager at its own shape)."""
        Ls = []
        for m in MODALITIES:
            b = next((lb for lb in self.length_buckets if lb >= lengths[m]), None)
            if b is None:
                return None
            Ls.append(b)
        return (next(b for b in self.batch_buckets if b >= n), *Ls)

    # -- internals ---------------------------------------------------------------------

    def _predict_split(self, split) -> torch.Tensor:
        from msa_fast.data.loader import gather_batch

        n = len(split)
        if n == 0:
            raise ValueError("samples: expected at least one sample, got an empty split")
        outs = []
        for s in range(0, n, self.max_batch):
            idx = torch.arange(s, min(n, s + self.max_batch))
            b = gather_batch(split, idx)
            _check_batch(b, self.dims)
            outs.append(self._predict_batch(b, len(idx)))
        return torch.cat(outs)

    def _predict_batch(self, batch: dict, n: int) -> torch.Tensor:
        from msa_fast import use_backend

        outs = []
        text_key = "text_bert" if "text_bert" in batch else "text"
        # aligned input (one padded length for every modality) stays aligned: one common
        # length bucket, since a model may read equal lengths as aligned data (FD-CMDIE's
        # global feature 'auto': mean when aligned, concat otherwise)
        aligned = len({batch[text_key].shape[_seq_dim(text_key)], batch["audio"].shape[1],
                       batch["vision"].shape[1]}) == 1
        with torch.inference_mode(), use_backend(self.backend):
            for s in range(0, n, self.max_batch):
                rows = slice(s, min(n, s + self.max_batch))
                k = rows.stop - rows.start
                lengths = _batch_lengths(batch, rows)
                if aligned:
                    lengths = dict.fromkeys(MODALITIES, max(lengths.values()))
                key = self.bucket_of(k, lengths)
                if key is None:  # outside the buckets: eager at the chunk's own shape
                    padded = _pad_rows(batch, rows, k, lengths)
                    outs.append(self._eager(padded)[:k])
                    continue
                padded = _pad_rows(batch, rows, key[0], dict(zip(MODALITIES, key[1:])))
                # the bucket plus the dict's keys and dtypes: everything a compiled graph or
                # CUDA graph is specialised on besides the bucket's shapes
                sig = tuple((name, v.dtype) for name, v in sorted(padded.items()))
                outs.append(self._run((*key, sig), padded)[:k])
        pred = torch.cat(outs).float().cpu()
        warn_if_implausible(pred.numpy(), (self.state or {}).get("label_absmax"),
                            f"Predictor of {self.model_name or type(self.model).__name__}")
        return pred

    def _eager(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
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
                out = fn(batch)  # first call of this bucket: compiles with the full guards
                self._compiled_keys.add(key)
                return out
            except Exception as e:  # noqa: BLE001 - this bucket runs eagerly from now on
                self._eager_keys.add(key)
                self._fallback("torch.compile", e)
                self._warn("torch.compile", e)
        return self._eager(batch)

    def _compiled_fn(self):
        if self._compiled is None:
            import torch._dynamo

            # one graph per bucket: (batch buckets) x (length buckets)^3 at most, compiled lazily
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 256))
            model = self.model

            def forward(batch):
                return model(batch)["pred"]

            self._compiled = torch.compile(forward, dynamic=False)
        return self._compiled

    def _replay(self, key: tuple, batch: dict) -> torch.Tensor:
        entry = self._graphs.get(key)
        if entry is None:
            static = {k: v.to(self.device).clone() for k, v in batch.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (lazy init, cuBLAS workspaces)
                    self.model(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model(static)["pred"]
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return out.clone()


__all__ = ["COMPILE_DEFAULT", "DEFAULT_LENGTH_BUCKETS", "Predictor", "collate_samples",
           "unpack_lstms"]
