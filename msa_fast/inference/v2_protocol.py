"""The Open Inference Protocol (KServe v2) REST wire format of ``msa-fast serve``, with the
binary tensor data extension, written directly (no server library speaks it; tritonclient's
HTTP client is the reference for the bytes).

Request body: a JSON header, then, where the header is shorter than the body
(``Inference-Header-Content-Length: <header bytes>``), the raw little-endian tensors in input
order, each input naming its byte count in ``parameters.binary_data_size``. An input without
``binary_data_size`` carries its values in ``data`` (flat row-major, or nested).

Inputs (``B`` rows; ``-1`` a free dimension in the metadata):

- ``TEXT`` FP32 ``(B, Lt, 768)`` (or ``TEXT_BERT`` INT64 ``(B, 3, Lt)``: ids, mask, segments,
  for a model on BERT ids), ``AUDIO`` FP32 ``(B, La, da)``, ``VISION`` FP32 ``(B, Lv, dv)``;
- ``TEXT_LENGTHS``, ``AUDIO_LENGTHS``, ``VISION_LENGTHS`` INT64 ``(B,)``, optional: row ``b``
  uses its first ``lengths[b]`` steps (default: all of them), so a batch of unequal lengths
  travels as one padded tensor;
- ``PRESENT`` BOOL ``(B, 3)``, optional: ``False`` drops the modality of that row (the drop
  protocol's zeros); a modality absent in every row may then be left out.

Outputs: ``SENTIMENT`` FP32 ``(B,)`` and ``CLASS_7`` INT64 ``(B,)`` =
``round(clip(sentiment, -3, 3))`` (MMSA's 7-class label). Binary where the request asks
(``parameters.binary_data_output``, or an output's ``parameters.binary_data``), else JSON.

Strictness, because a silent conversion hides a client bug: the datatype must be the one the
metadata names (FP64 for FP32 is an error, not a cast); JSON numbers must be numbers (no
strings, no booleans; an integer is a number); FP32 values must be finite (a NaN or a float64
beyond float32's range is an error); shapes must agree with the data and ``binary_data_size``.
Every failure is a :class:`ProtocolError` carrying the HTTP status and one message that names
the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pydantic_core
from pydantic import TypeAdapter, ValidationError

from msa_fast.inference.serve_limits import ServeLimits

MODALITIES = ("text", "audio", "vision")
DTYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"), "BOOL": np.dtype("?")}
# strict=True: bool is not a number, "1" is not a number; int is a float
_JSON_DATA = {"FP32": TypeAdapter(list[float]), "INT64": TypeAdapter(list[int]),
              "BOOL": TypeAdapter(list[bool])}
OUTPUTS = {"SENTIMENT": "FP32", "CLASS_7": "INT64"}
MAX_ERRORS = 3


class ProtocolError(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def input_specs(limits: ServeLimits) -> list[dict]:
    """The inputs of the model metadata, in the order a client should send them."""
    text = {"name": "TEXT_BERT", "datatype": "INT64", "shape": [-1, 3, -1]} if limits.bert else \
        {"name": "TEXT", "datatype": "FP32", "shape": [-1, -1, limits.text]}
    return [text,
            {"name": "AUDIO", "datatype": "FP32", "shape": [-1, -1, limits.audio]},
            {"name": "VISION", "datatype": "FP32", "shape": [-1, -1, limits.vision]},
            *({"name": f"{m.upper()}_LENGTHS", "datatype": "INT64", "shape": [-1]} for m in MODALITIES),
            {"name": "PRESENT", "datatype": "BOOL", "shape": [-1, 3]}]


def model_metadata(name: str, limits: ServeLimits, platform: str) -> dict:
    return {"name": name, "versions": ["1"], "platform": platform,
            "inputs": input_specs(limits),
            "outputs": [{"name": k, "datatype": v, "shape": [-1]} for k, v in OUTPUTS.items()]}


@dataclass
class InferRequest:
    samples: list  # per-sample dicts for Predictor.predict
    outputs: list  # [(name, binary)] in answer order
    request_id: str | None


def _json(raw, what: str):
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as e:
        raise ProtocolError(f"{what}: not valid JSON ({e})") from None


def _capped(e: ValidationError, where: str) -> str:
    """The first few errors of a validation and their count: a wrong row of 38 400 floats is
    one line, not 38 400 entries."""
    errs = e.errors(include_url=False, include_input=False)
    shown = "; ".join(f"{'/'.join(str(x) for x in err['loc']) or '.'}: {err['msg']}"
                      for err in errs[:MAX_ERRORS])
    more = f" (and {len(errs) - MAX_ERRORS} more errors)" if len(errs) > MAX_ERRORS else ""
    return f"{where}: {shown}{more}"


def _flatten(data, where: str) -> list:
    """Nested JSON data as one flat list (row-major), one level at a time."""
    while data and isinstance(data[0], list):
        if not all(isinstance(r, list) for r in data):
            raise ProtocolError(f"{where}: data mixes numbers and nested lists")
        data = [x for r in data for x in r]
    return data


def _shape(raw, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise ProtocolError(f"{where}: shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _tensors(header: dict, binary: memoryview, limits: ServeLimits) -> dict[str, np.ndarray]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("inputs: expected a non-empty list of tensors")
    specs = {s["name"]: s for s in input_specs(limits)}
    other_text = "TEXT" if limits.bert else "TEXT_BERT"
    out, offset = {}, 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError(f"inputs[{i}]: expected an object with a name")
        name = t["name"]
        if name not in specs:
            hint = f" (this model takes {'TEXT_BERT' if limits.bert else 'TEXT'})" \
                if name == other_text else ""
            raise ProtocolError(f"{name}: unknown input{hint}; the inputs are {', '.join(specs)}")
        if name in out:
            raise ProtocolError(f"{name}: given twice")
        dtype = t.get("datatype")
        if dtype != specs[name]["datatype"]:
            raise ProtocolError(f"{name}: expected datatype {specs[name]['datatype']}, got {dtype!r}")
        shape = _shape(t.get("shape"), name)
        count = math.prod(shape)
        np_dtype = DTYPES[dtype]
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"{name}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise ProtocolError(f"{name}: binary_data_size must be a non-negative integer, got {size!r}")
            if size != count * np_dtype.itemsize:
                raise ProtocolError(f"{name}: shape {list(shape)} of {dtype} is {count * np_dtype.itemsize} "
                                    f"bytes, but binary_data_size is {size}")
            if offset + size > len(binary):
                raise ProtocolError(f"{name}: truncated body: the tensors need {offset + size} bytes "
                                    f"after the header, got {len(binary)}")
            a = np.frombuffer(binary, np_dtype, count, offset).reshape(shape)
            offset += size
            if dtype == "BOOL" and a.view(np.uint8).max(initial=0) > 1:
                raise ProtocolError(f"{name}: BOOL bytes must be 0 or 1")
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise ProtocolError(f"{name}: expected data (a list) or parameters.binary_data_size")
            try:
                flat = _JSON_DATA[dtype].validate_python(_flatten(data, name), strict=True)
            except ValidationError as e:
                raise ProtocolError(_capped(e, f"{name}: data")) from None
            if len(flat) != count:
                raise ProtocolError(f"{name}: shape {list(shape)} holds {count} values, data has {len(flat)}")
            a = np.array(flat, np.float64 if dtype == "FP32" else np_dtype).reshape(shape)
        out[name] = a
    if offset != len(binary):
        raise ProtocolError(f"body: {len(binary)} bytes follow the header, the inputs' "
                            f"binary_data_size add up to {offset}")
    return out


def _check_float(name: str, a: np.ndarray, width: int, max_length: int) -> np.ndarray:
    if a.ndim != 3 or a.shape[2] != width or a.shape[1] < 1:
        raise ProtocolError(f"{name}: expected shape [B, L, {width}] with L >= 1, got {list(a.shape)}")
    if a.shape[1] > max_length:
        raise ProtocolError(f"{name}: expected at most {max_length} steps (--max-length), got {a.shape[1]}")
    # float64 (JSON) first: a finite double beyond float32's range is an error, not an inf
    finite = np.isfinite(a)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ProtocolError(f"{name}: expected finite values, got {a[bad]} at {list(bad)}")
    if a.dtype != np.float32:
        if a.size and np.abs(a).max() > np.finfo(np.float32).max:
            raise ProtocolError(f"{name}: values beyond float32's range")
        a = a.astype(np.float32)
    return a


def _samples(t: dict[str, np.ndarray], limits: ServeLimits) -> list[dict]:
    text_name = "TEXT_BERT" if limits.bert else "TEXT"
    names = {"text": text_name, "audio": "AUDIO", "vision": "VISION"}
    batch = {n: a.shape[0] for n, a in t.items()}
    if len(set(batch.values())) != 1:
        raise ProtocolError(f"inputs: batch sizes differ: {batch}")
    B = next(iter(batch.values()))
    if B < 1:
        raise ProtocolError("inputs: expected a batch of at least one row")
    present = t.get("PRESENT")
    if present is not None and present.shape != (B, 3):
        raise ProtocolError(f"PRESENT: expected shape [{B}, 3], got {list(present.shape)}")
    data, lengths = {}, {}
    for mi, m in enumerate(MODALITIES):
        name = names[m]
        if name not in t:
            if present is not None and not present[:, mi].any():
                continue
            raise ProtocolError(f"{name}: required input missing (or mark it absent in PRESENT)")
        a = t[name]
        if m == "text" and limits.bert:
            if a.ndim != 3 or a.shape[1] != 3 or a.shape[2] < 1:
                raise ProtocolError(f"{name}: expected shape [B, 3, Lt] (ids, mask, segments), got {list(a.shape)}")
            if a.shape[2] > limits.max_length:
                raise ProtocolError(f"{name}: expected at most {limits.max_length} steps (--max-length), "
                                    f"got {a.shape[2]}")
            if a.size and a.min() < 0:
                raise ProtocolError(f"{name}: expected non-negative ids")
            L = a.shape[2]
        else:
            a = _check_float(name, a, limits.width(m), limits.max_length)
            L = a.shape[1]
        data[m] = a
        ln = t.get(f"{m.upper()}_LENGTHS")
        if ln is not None:
            if ln.shape != (B,):
                raise ProtocolError(f"{m.upper()}_LENGTHS: expected shape [{B}], got {list(ln.shape)}")
            if ln.size and (ln.min() < 1 or ln.max() > L):
                raise ProtocolError(f"{m.upper()}_LENGTHS: expected lengths in 1..{L} (the "
                                    f"{name} tensor's steps), got {ln.min()}..{ln.max()}")
            lengths[m] = ln.tolist()
    out = []
    for b in range(B):
        s = {}
        for mi, m in enumerate(MODALITIES):
            if m not in data or (present is not None and not present[b, mi]):
                continue
            a = data[m]
            n = lengths[m][b] if m in lengths else None
            s["text_bert" if (m == "text" and limits.bert) else m] = \
                (a[b] if n is None else a[b, :, :n]) if (m == "text" and limits.bert) else \
                (a[b] if n is None else a[b, :n])
        if not s:
            raise ProtocolError(f"PRESENT: row {b} has no modality present")
        out.append(s)
    return out


def _outputs(header: dict) -> list[tuple[str, bool]]:
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("parameters must be an object")
    default_binary = params.get("binary_data_output", False) is True
    req = header.get("outputs")
    if req is None:
        return [(n, default_binary) for n in OUTPUTS]
    if not isinstance(req, list):
        raise ProtocolError("outputs: expected a list")
    out = []
    for i, o in enumerate(req):
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(f"outputs[{i}]: unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")
        p = o.get("parameters") or {}
        if p.get("classification"):
            raise ProtocolError(f"{name}: the classification extension is not supported")
        out.append((name, p.get("binary_data", default_binary) is True))
    return out


def parse_infer(body: bytes, header_length: str | None, limits: ServeLimits) -> InferRequest:
    """The :class:`InferRequest` of a ``POST /v2/models/{name}/infer`` body."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length: not an integer ({header_length!r})") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length: {n} is not within the body's "
                                f"{len(body)} bytes (truncated body?)")
    # one copy, so that the tensors are writable views (torch.from_numpy warns on read-only)
    buf = bytearray(body) if n < len(body) else b""
    header = _json(body[:n] if header_length is not None else body, "inference header")
    if not isinstance(header, dict):
        raise ProtocolError("inference header: expected a JSON object")
    tensors = _tensors(header, memoryview(buf)[n:], limits)
    rid = header.get("id")
    return InferRequest(_samples(tensors, limits), _outputs(header),
                        rid if isinstance(rid, str) else None)


def class_7(sentiment: np.ndarray) -> np.ndarray:
    return np.round(np.clip(sentiment, -3.0, 3.0)).astype(np.int64)


def encode_infer(model: str, req: InferRequest, sentiment: np.ndarray) -> tuple[bytes, int | None]:
    """The response body and, where it carries binary tensors, its JSON header's length (the
    ``Inference-Header-Content-Length``)."""
    import json

    values = {"SENTIMENT": sentiment.astype("<f4", copy=False), "CLASS_7": class_7(sentiment)}
    outs, raw = [], []
    for name, binary in req.outputs:
        a = values[name]
        o = {"name": name, "datatype": OUTPUTS[name], "shape": [int(a.shape[0])]}
        if binary:
            b = a.astype(DTYPES[OUTPUTS[name]], copy=False).tobytes()
            o["parameters"] = {"binary_data_size": len(b)}
            raw.append(b)
        else:
            o["data"] = a.tolist()
        outs.append(o)
    resp = {"model_name": model, "model_version": "1", "outputs": outs}
    if req.request_id is not None:
        resp["id"] = req.request_id
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not raw:
        return head, None
    return b"".join([head, *raw]), len(head)


__all__ = ["InferRequest", "OUTPUTS", "ProtocolError", "class_7", "encode_infer", "input_specs",
           "model_metadata", "parse_infer"]
