"""What ``msa-fast serve`` accepts: the checkpoint's widths, the longest sequence and the
largest body, shared by the request parsers (:mod:`~msa_fast.inference.v2_protocol`,
:mod:`~msa_fast.inference.predict_json`) and the server.

``max_body`` defaults to the larger of

- the JSON body of one sample at ``max_length`` steps (``POST /predict``, or a v2 request with
  JSON data), at 32 bytes a number: ``repr`` of a float64 with its separator is at most 25
  characters (``-1.2345678901234567e-305, ``), plus the indentation a pretty-printer adds, and
- the binary v2 body of a ``max_batch`` batch at ``max_length`` steps (4 bytes a value, plus
  the lengths and the present flags),

plus 64 KiB for the JSON header. A body over it is refused from its ``Content-Length`` (413)
before a byte of it is read, so a huge body costs the server no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from msa_fast.data.schema import PRESET_DIMS

JSON_BYTES_PER_NUMBER = 32
HEADER_SLACK = 64 * 1024
MMSA_ALIGNED_LENGTH = 50


@dataclass(frozen=True)
class ServeLimits:
    text: int
    audio: int
    vision: int
    text_input: str  # "features" (TEXT FP32) or "bert" (TEXT_BERT INT64 ids)
    max_length: int
    max_batch: int
    max_body: int

    @property
    def bert(self) -> bool:
        return self.text_input == "bert"

    def width(self, modality: str) -> int:
        return getattr(self, modality)


def default_max_body(dims: dict, max_length: int, max_batch: int) -> int:
    text = 3 if dims.get("text_input") == "bert" else dims["text"]
    per_step = text + dims["audio"] + dims["vision"]
    json_one = max_length * per_step * JSON_BYTES_PER_NUMBER
    binary_batch = max_batch * (max_length * per_step * 4 + 3 * 8 + 3)
    return max(json_one, binary_batch) + HEADER_SLACK


def data_lengths(state: dict) -> tuple[int, int, int]:
    """The sequence lengths of the run's data, for the default warm-up, without reading the
    data: the state keeps its widths and layout but not its lengths. MMSA's aligned features
    are 50 steps; unaligned ones keep the preset's audio / vision lengths (matched by widths:
    MOSI 375 / 500, MOSEI 500 / 500); anything else warms up at 50."""
    dims = state["dims"]
    if state.get("aligned", True):
        return (MMSA_ALIGNED_LENGTH,) * 3
    for preset in PRESET_DIMS.values():
        if preset["audio"] == dims["audio"] and preset["vision"] == dims["vision"]:
            return MMSA_ALIGNED_LENGTH, preset["audio_len"], preset["vision_len"]
    return (MMSA_ALIGNED_LENGTH,) * 3


__all__ = ["ServeLimits", "data_lengths", "default_max_body"]
