"""Missing-modality protocols, applied to batches, seeded.

``missing_rate`` (MMSA, ``__generate_missing``): every valid token / frame of modality m is
kept iff ``u > rate_m`` with ``u ~ U[0, 1)``. Dropped text ids become ``[UNK]`` (id 100);
the first (CLS) and last valid (SEP) positions are always kept. Dropped audio / vision
frames, and dropped positions of 768-d ``text`` features (MMSA only masks ids; zeroing the
feature is our equivalent), are set to 0. Masks and lengths are unchanged, as in MMSA.

``drop_rate`` (MPLMM): each sample is, with probability ``drop_rate``, made incomplete by
removing one or two whole modalities, the pattern drawn uniformly from the six
``{t}, {a}, {v}, {t,a}, {t,v}, {a,v}``. A removed modality is zeroed (text ids -> [UNK]
except CLS/SEP; 768-d features zeroed everywhere) and ``present[b, m]`` is cleared so that models with prompts for missing
modalities (ProMMA) can see it; masks stay as they were so encoders need no special case.

For evaluation protocols (:mod:`msa_fast.robustness`): :func:`drop_modalities` removes a
fixed set of modalities from every sample (MPLMM's seven test patterns) exactly as the
random drop does, and :func:`add_gaussian_noise` adds per-channel-scaled Gaussian noise
to one modality's valid positions.

All return a new batch (inputs are never modified in place: the split tensors are shared).
Randomness comes from the ``torch.Generator`` passed in; the trainer seeds one per
(seed, split, epoch), so evaluation masks are the same on every evaluation and a resumed run
draws the same training masks.
"""

from __future__ import annotations

import torch

UNK_ID = 100
DROP_PATTERNS = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2))
_MODS = ("text", "audio", "vision")


def _as_rates(rate) -> tuple[float, float, float]:
    if isinstance(rate, (int, float)):
        rate = (float(rate),) * 3
    rate = tuple(float(r) for r in rate)
    if len(rate) != 3 or not all(0.0 <= r <= 1.0 for r in rate):
        raise ValueError(f"missing_rate: expected one rate or three (t, a, v) in [0, 1], got {rate}")
    return rate


def _text_special(batch: dict) -> torch.Tensor:
    """(B, Lt) bool: the CLS position and the last valid (SEP) position."""
    lengths = batch["text_lengths"]
    B, Lt = batch["text_mask"].shape
    special = torch.zeros(B, Lt, dtype=torch.bool)
    special[:, 0] = True
    special[torch.arange(B), (lengths - 1).clamp(min=0)] = True
    return special


def _drop_text(batch: dict, drop: torch.Tensor) -> None:
    """Apply a (B, Lt) bool drop mask to text ids / features (in the new batch)."""
    if "text_bert" in batch:
        tb = batch["text_bert"].clone()
        tb[:, 0] = torch.where(drop, torch.full_like(tb[:, 0], UNK_ID), tb[:, 0])
        batch["text_bert"] = tb
    if "text" in batch:
        batch["text"] = batch["text"] * (~drop).unsqueeze(-1).to(batch["text"].dtype)


def apply_missing_rate(batch: dict, rate, generator: torch.Generator) -> dict:
    rates = _as_rates(rate)
    out = dict(batch)
    for m, r in zip(_MODS, rates):
        if r == 0.0:
            continue
        valid = ~batch[f"{m}_mask"]
        u = torch.rand(valid.shape, generator=generator)
        drop = valid & ~(u > r)
        if m == "text":
            _drop_text(out, drop & ~_text_special(batch))
        else:
            out[m] = batch[m] * (~drop).unsqueeze(-1).to(batch[m].dtype)
    return out


def apply_modality_drop(batch: dict, drop_rate: float, generator: torch.Generator) -> dict:
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate: expected a value in [0, 1], got {drop_rate}")
    B = batch["labels"].shape[0]
    incomplete = torch.rand(B, generator=generator) < drop_rate
    pattern = torch.randint(len(DROP_PATTERNS), (B,), generator=generator)
    removed = torch.zeros(B, 3, dtype=torch.bool)
    for p, mods in enumerate(DROP_PATTERNS):
        for m in mods:
            removed[:, m] |= incomplete & (pattern == p)
    return remove_modalities(batch, removed)


def remove_modalities(batch: dict, removed: torch.Tensor) -> dict:
    """Remove whole modalities per sample, as the drop protocol does: ``removed (B, 3)`` bool
    (t, a, v); ``present`` is cleared there, text ids -> [UNK] except CLS/SEP, 768-d text
    features and audio / vision zeroed everywhere. Returns a new batch."""
    out = dict(batch)
    out["present"] = batch["present"] & ~removed
    if removed[:, 0].any():
        valid = ~batch["text_mask"] & ~_text_special(batch)
        _drop_text(out, valid & removed[:, 0:1])
        if "text" in batch:  # a removed feature sequence is zero everywhere, CLS/SEP included
            out["text"] = batch["text"] * (~removed[:, 0]).to(batch["text"].dtype)[:, None, None]
    for mi, m in ((1, "audio"), (2, "vision")):
        if removed[:, mi].any():
            keep = (~removed[:, mi]).to(batch[m].dtype)[:, None, None]
            out[m] = batch[m] * keep
    return out


def drop_modalities(batch: dict, mods) -> dict:
    """The deterministic drop of MPLMM's fixed patterns: remove modalities ``mods`` (indices
    into t, a, v; ``()`` = the complete pattern) from every sample (:func:`remove_modalities`)."""
    mods = tuple(mods)
    if any(m not in (0, 1, 2) for m in mods):
        raise ValueError(f"mods: expected modality indices in (0, 1, 2), got {mods}")
    B = batch["labels"].shape[0]
    removed = torch.zeros(B, 3, dtype=torch.bool)
    removed[:, list(mods)] = True
    return remove_modalities(batch, removed)


def add_gaussian_noise(batch: dict, modality: str, level: float, std: torch.Tensor,
                       generator: torch.Generator) -> dict:
    """``x + level * std_c * n`` with ``n ~ N(0, 1)`` on the valid (non-padded) positions of
    ``modality`` (``text`` features, ``audio`` or ``vision``); ``std (D,)`` is the per-channel
    feature standard deviation (:func:`msa_fast.robustness.feature_std`). Padded positions
    stay as they are. The noise is drawn for the whole ``(B, L, D)`` block from ``generator``
    (so a given generator state gives the same noise whatever ``level`` is). A new batch."""
    if modality not in _MODS:
        raise ValueError(f"modality: expected one of {_MODS}, got {modality!r}")
    if modality not in batch:
        raise ValueError(f"modality: the batch has no {modality!r} features (token ids cannot be noised)")
    if not level >= 0.0:
        raise ValueError(f"level: expected a noise level >= 0, got {level}")
    x = batch[modality]
    if std.shape != x.shape[-1:]:
        raise ValueError(f"std: expected shape ({x.shape[-1]},), got {tuple(std.shape)}")
    n = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
    valid = (~batch[f"{modality}_mask"]).unsqueeze(-1).to(x.dtype)
    out = dict(batch)
    out[modality] = x + level * std.to(x.dtype) * n * valid
    return out


class MissingProtocol:
    """Both protocols with their rates; ``generator(seed, split, epoch)`` makes the RNG."""

    def __init__(self, missing_rate=0.0, drop_rate: float = 0.0):
        self.missing_rate = _as_rates(missing_rate)
        self.drop_rate = float(drop_rate)
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate: expected a value in [0, 1], got {drop_rate}")

    @property
    def active(self) -> bool:
        return any(self.missing_rate) or self.drop_rate > 0

    @staticmethod
    def generator(seed: int, split: str, epoch: int = 0) -> torch.Generator:
        code = {"train": 1, "valid": 2, "test": 3}.get(split, 4)
        return torch.Generator().manual_seed((seed * 1009 + code) * 100003 + epoch)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        if any(self.missing_rate):
            batch = apply_missing_rate(batch, self.missing_rate, generator)
        if self.drop_rate > 0:
            batch = apply_modality_drop(batch, self.drop_rate, generator)
        return batch
