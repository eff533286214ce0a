"""Load an MMSA processed pickle into tensors: clean, check, derive lengths.

Cleaning (contract §5): every non-finite feature value (audio ``-inf`` from COVAREP, ``NaN`` in
any modality, ``+inf``) becomes 0. The counts per split and modality are kept in
:attr:`MMSAData.report` and logged once, as one warning line, when the pickle is loaded.

Lengths: text lengths are the sums of the ``text_bert`` attention masks (CLS and SEP
included); without ``text_bert`` a trailing run of all-zero ``text`` rows counts as padding.
Aligned data shares the text lengths for audio and vision; unaligned data uses
``audio_lengths`` / ``vision_lengths``, clamped to ``[1, L]`` so that a packed LSTM never
sees an empty sequence (MOSEI has a few zero-length entries). Padding is at the end.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from msa_fast.data import safe_pickle
from msa_fast.data.schema import SPLITS, SchemaError, check_pickle

log = logging.getLogger("msa_fast.data")


@dataclass
class SplitData:
    """One split as tensors. ``text`` or ``text_bert`` (ids, mask, segments; int64) is set."""

    labels: torch.Tensor  # (N,) float32
    audio: torch.Tensor  # (N, La, da) float32
    vision: torch.Tensor  # (N, Lv, dv) float32
    text_lengths: torch.Tensor  # (N,) int64
    audio_lengths: torch.Tensor
    vision_lengths: torch.Tensor
    text: torch.Tensor | None = None  # (N, Lt, 768) float32
    text_bert: torch.Tensor | None = None  # (N, 3, Lt) int64
    ids: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # noise_level etc. as tensors, (N, ...)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> SplitData:
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]
        return SplitData(
            labels=pick(self.labels), audio=pick(self.audio), vision=pick(self.vision),
            text_lengths=pick(self.text_lengths), audio_lengths=pick(self.audio_lengths),
            vision_lengths=pick(self.vision_lengths), text=pick(self.text),
            text_bert=pick(self.text_bert), ids=[self.ids[i] for i in index.tolist()] if self.ids else [],
            extra={k: v[index] for k, v in self.extra.items()},
        )


@dataclass
class MMSAData:
    splits: dict[str, SplitData]
    aligned: bool
    dims: dict  # {"text": 768, "audio": da, "vision": dv, "text_input": "features"|"bert"}
    report: dict  # {split: {modality: {"nan": n, "neginf": n, "posinf": n}}}
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitData:
        return self.splits[split]


def _clean(arr: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, dict]:
    """float32 copy-free where possible; non-finite -> 0 in place, row chunks to bound memory."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:
        arr = arr.copy()
    counts = {"nan": 0, "neginf": 0, "posinf": 0}
    for s in range(0, arr.shape[0], chunk):
        part = arr[s : s + chunk]
        bad = ~np.isfinite(part)
        if bad.any():
            vals = part[bad]
            counts["nan"] += int(np.isnan(vals).sum())
            counts["neginf"] += int(np.isneginf(vals).sum())
            counts["posinf"] += int(np.isposinf(vals).sum())
            part[bad] = 0.0
    return arr, counts


def _text_lengths(split: dict, text: np.ndarray | None) -> np.ndarray:
    if "text_bert" in split:
        return np.asarray(split["text_bert"])[:, 1, :].sum(axis=1).astype(np.int64)
    nonzero = np.abs(text).sum(axis=2) > 0  # (N, L)
    last = text.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, text.shape[1]).astype(np.int64)


def _numeric(name: str, key: str, value, dtype=np.float32) -> np.ndarray:
    """``value`` as a numeric array, or a :class:`SchemaError` naming the split and key
    (a pickle whose labels or features are strings or objects)."""
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(dtype, copy=False)
    except (TypeError, ValueError) as e:
        kind = type(value).__name__ if not hasattr(value, "dtype") else f"array of {value.dtype}"
        raise SchemaError(f"split {name!r}: {key!r} expected numbers, got {kind} "
                          f"({str(e).splitlines()[0]})") from None


def split_from_dict(name: str, split: dict, aligned: bool) -> tuple[SplitData, dict]:
    split = dict(split)
    for key in ("text", "text_bert", "audio", "vision", "regression_labels",
                "audio_lengths", "vision_lengths"):
        if key in split:
            dtype = np.int64 if key.endswith("_lengths") else np.float32
            split[key] = _numeric(name, key, split[key], dtype)
    report = {}
    text = None
    if "text" in split:
        text, report["text"] = _clean(split["text"])
    audio, report["audio"] = _clean(split["audio"])
    vision, report["vision"] = _clean(split["vision"])
    tb = None
    if "text_bert" in split:
        tb_np = np.asarray(split["text_bert"])
        if not np.isfinite(tb_np).all():
            raise SchemaError(f"split {name!r}: 'text_bert' holds non-finite token ids")
        tb = torch.from_numpy(np.rint(tb_np).astype(np.int64))
    t_len = np.clip(_text_lengths(split, text), 1, None)
    if aligned:
        a_len = v_len = t_len
    else:
        a_len = np.clip(np.asarray(split["audio_lengths"]).astype(np.int64), 1, audio.shape[1])
        v_len = np.clip(np.asarray(split["vision_lengths"]).astype(np.int64), 1, vision.shape[1])
    labels = np.asarray(split["regression_labels"], dtype=np.float32).reshape(-1)
    if not np.isfinite(labels).all():
        raise SchemaError(f"split {name!r}: 'regression_labels' holds non-finite values")
    extra = {}
    for key in ("noise_level", "latent"):
        if key in split:
            extra[key] = torch.from_numpy(np.asarray(split[key], dtype=np.float32))
    # synthetic:<preset>:pid: which modality of a sample is corrupted (N, 3) and where each
    # modality's cue lies, (N, 3, 2) (start, length) in t/a/v order
    if "corrupted" in split:
        extra["corrupted"] = torch.from_numpy(np.asarray(split["corrupted"], dtype=bool).copy())
    if "window" in split:
        extra["window"] = torch.from_numpy(np.asarray(split["window"], dtype=np.int64).copy())
    ids = [str(i) for i in split["id"]] if "id" in split else []
    data = SplitData(
        labels=torch.from_numpy(labels), audio=torch.from_numpy(audio),
        vision=torch.from_numpy(vision), text_lengths=torch.from_numpy(t_len.copy()),
        audio_lengths=torch.from_numpy(np.asarray(a_len).copy()),
        vision_lengths=torch.from_numpy(np.asarray(v_len).copy()),
        text=None if text is None else torch.from_numpy(text), text_bert=tb, ids=ids, extra=extra,
    )
    return data, report


def from_pickle_dict(pkl: dict, source: str = "", limit: int | None = None) -> MMSAData:
    """Check and convert an already-unpickled MMSA dict. ``limit`` keeps the first rows."""
    info = check_pickle(pkl)
    aligned = {i["aligned"] for i in info.values()}
    if len(aligned) != 1:
        raise SchemaError("splits disagree on alignment (some have *_lengths, some not)")
    aligned = aligned.pop()
    splits, report = {}, {}
    for name in SPLITS:
        split = pkl[name]
        if limit is not None:
            split = {k: (v[:limit] if hasattr(v, "__getitem__") and not isinstance(v, (str, dict))
                         else v) for k, v in split.items()}
        splits[name], report[name] = split_from_dict(name, split, aligned)
    tr = splits["train"]
    dims = {
        "text": int(tr.text.shape[2]) if tr.text is not None else 768,
        "audio": int(tr.audio.shape[2]),
        "vision": int(tr.vision.shape[2]),
        "text_input": "features" if tr.text is not None else "bert",
    }
    bad = {s: {m: c for m, c in r.items() if sum(c.values())} for s, r in report.items()}
    bad = {s: r for s, r in bad.items() if r}
    if bad:
        parts = [f"{s}/{m}: " + ", ".join(f"{v} {k}" for k, v in c.items() if v)
                 for s, r in bad.items() for m, c in r.items()]
        log.warning("%s: non-finite feature values set to 0 (%s)", source or "data", "; ".join(parts))
    outside = {s: (int((d.labels.abs() > 3).sum()), float(d.labels.abs().max()) if d.labels.numel() else 0.0)
               for s, d in splits.items()}
    outside = {s: v for s, v in outside.items() if v[0]}
    if outside:  # MMSA's labels lie in [-3, 3]; metrics clip to it (Mult_acc_7), MAE does not
        log.warning("%s: regression labels outside MMSA's [-3, 3] (%s): a scaled or foreign label set? "
                    "MAE and Corr are computed on them as they are", source or "data",
                    "; ".join(f"{s}: {n}, max |y| {m:.4g}" for s, (n, m) in outside.items()))
    meta = pkl.get("synthetic", {}) if isinstance(pkl.get("synthetic"), dict) else {}
    return MMSAData(splits=splits, aligned=aligned, dims=dims, report=report, source=source, meta=meta)


def load_pickle(path: str, limit: int | None = None) -> MMSAData:
    """Load ``aligned_50.pkl`` / ``unaligned_50.pkl`` (or any file in that schema)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise SchemaError(f"data path is a directory, expected a pickle file: {path}")
    try:
        with open(path, "rb") as f:
            pkl = safe_pickle.load(f)
    except safe_pickle.UnsafePickleError as e:
        raise safe_pickle.UnsafePickleError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            TypeError, IndexError, KeyError, MemoryError, OverflowError) as e:
        # a truncated or corrupt file fails in any of these, depending on where it ends
        raise SchemaError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    try:
        return from_pickle_dict(pkl, source=path, limit=limit)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
