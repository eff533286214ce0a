"""The MMSA processed-pickle schema (contract §5) and its check.

``pkl[split]`` for split in ``train / valid / test`` is a dict with

==================  =====================  =========================================
key                 shape                  meaning
==================  =====================  =========================================
``text``            (N, Lt, 768) float     BERT features (needed unless ``text_bert``)
``text_bert``       (N, 3, Lt) float       token ids, attention mask, segment ids
``audio``           (N, La, da) float      COVAREP-like frames (MOSI da=5, MOSEI 74)
``vision``          (N, Lv, dv) float      Facet-like frames (MOSI dv=20, MOSEI 35)
``audio_lengths``   (N,) int               unaligned only: valid frames per sample
``vision_lengths``  (N,) int               unaligned only
``regression_labels`` (N,) float           sentiment in [-3, 3]
``id``              (N,)                   utterance ids
``raw_text``        (N,)                   transcripts
==================  =====================  =========================================

Aligned pickles have ``La = Lv = Lt`` (50) and no ``*_lengths``; their padding is the
text attention mask. Extra keys are allowed (the synthetic generator adds some).
"""

from __future__ import annotations

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "vision")
REQUIRED = ("audio", "vision", "regression_labels")

# Feature widths and real sequence lengths of the two presets (contract §5).
PRESET_DIMS = {
    "mosi": {"text": 768, "audio": 5, "vision": 20, "audio_len": 375, "vision_len": 500},
    "mosei": {"text": 768, "audio": 74, "vision": 35, "audio_len": 500, "vision_len": 500},
}


class SchemaError(ValueError):
    """A pickle that does not follow the MMSA schema; the message names the key."""


def check_split(name: str, split: dict) -> dict:
    """Validate one split; return ``{"n", "aligned", "text_kind"}`` or raise :class:`SchemaError`."""
    if not isinstance(split, dict):
        raise SchemaError(f"split {name!r}: expected a dict, got {type(split).__name__}")
    for key in REQUIRED:
        if key not in split:
            raise SchemaError(f"split {name!r}: missing key {key!r}")
    if "text" not in split and "text_bert" not in split:
        raise SchemaError(f"split {name!r}: missing key 'text' (or 'text_bert')")
    n = len(split["regression_labels"])

    def shape(key):
        return tuple(getattr(split[key], "shape", (len(split[key]),)))

    expect_rank = {"text": 3, "text_bert": 3, "audio": 3, "vision": 3,
                   "audio_lengths": 1, "vision_lengths": 1}
    for key, rank in expect_rank.items():
        if key not in split:
            continue
        s = shape(key)
        if len(s) != rank:
            raise SchemaError(f"split {name!r}: {key!r} expected rank {rank}, got shape {s}")
        if s[0] != n:
            raise SchemaError(
                f"split {name!r}: {key!r} has {s[0]} samples but regression_labels has {n}")
    for key in ("id", "raw_text"):
        if key in split and len(split[key]) != n:
            raise SchemaError(
                f"split {name!r}: {key!r} has {len(split[key])} entries but regression_labels has {n}")
    if "text_bert" in split and shape("text_bert")[1] != 3:
        raise SchemaError(
            f"split {name!r}: 'text_bert' expected shape (N, 3, L), got {shape('text_bert')}")
    lt = shape("text")[1] if "text" in split else shape("text_bert")[2]
    if "text" in split and "text_bert" in split and shape("text_bert")[2] != lt:
        raise SchemaError(
            f"split {name!r}: 'text' length {lt} != 'text_bert' length {shape('text_bert')[2]}")
    aligned = "audio_lengths" not in split and "vision_lengths" not in split
    if aligned:
        for key in ("audio", "vision"):
            if shape(key)[1] != lt:
                raise SchemaError(
                    f"split {name!r}: aligned data (no '{key}_lengths') needs {key!r} length {lt} "
                    f"(the text length), got {shape(key)[1]}")
    else:
        for key in ("audio_lengths", "vision_lengths"):
            if key not in split:
                raise SchemaError(f"split {name!r}: unaligned data is missing key {key!r}")
    return {"n": n, "aligned": aligned, "text_kind": "features" if "text" in split else "bert"}


def check_pickle(pkl) -> dict:
    """Validate a whole pickle; return per-split info. Splits must agree on widths."""
    if not isinstance(pkl, dict):
        raise SchemaError(f"expected a dict of splits {SPLITS}, got {type(pkl).__name__}")
    info = {}
    for name in SPLITS:
        if name not in pkl:
            raise SchemaError(f"missing split {name!r} (have {sorted(map(str, pkl))})")
        info[name] = check_split(name, pkl[name])
    ref = pkl["train"]
    for name in SPLITS[1:]:
        for key in ("text", "audio", "vision"):
            if key in ref and key in pkl[name] and ref[key].shape[2] != pkl[name][key].shape[2]:
                raise SchemaError(
                    f"split {name!r}: {key!r} width {pkl[name][key].shape[2]} != train's "
                    f"{ref[key].shape[2]}")
    return info
