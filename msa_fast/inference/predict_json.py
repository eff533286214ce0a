"""``POST /predict``: one sample as JSON, for curl.

``{"text": [[...768 floats], ...], "audio": [[...da], ...], "vision": [[...dv], ...]}``
(``text_bert`` ``[[ids], [mask], [segments]]`` instead of ``text`` for a model on BERT ids)
-> ``{"sentiment": float, "class_7": int}``.

A failure is a 422 with the protocol's ``{"error": "<field>: ..."}`` (the first few problems
and their count) plus ``detail`` (``[{"loc": ["body", field, ...], "msg"}]``, capped the same
way) for clients of the earlier FastAPI server. The JSON is parsed with pydantic-core's parser
(1.6 ms for a 0.8 MB MOSI sample; the standard library's ``json.loads`` took 21 ms) and the
rows are checked in strict mode (a string or a boolean is not a number), both in Rust.
"""

from __future__ import annotations

import numpy as np
from pydantic import TypeAdapter, ValidationError

from msa_fast.inference.serve_limits import ServeLimits
from msa_fast.inference.v2_protocol import MAX_ERRORS, ProtocolError, _json

_ROWS = TypeAdapter(list[list[float]])
_IDS = TypeAdapter(list[list[int]])


class PredictError(ProtocolError):
    """A 422 of ``POST /predict``; ``detail`` the capped per-field entries."""

    def __init__(self, message: str, detail: list[dict]):
        super().__init__(message, 422)
        self.detail = detail


def _fail(field: str, msg: str, loc=()) -> PredictError:
    return PredictError(f"{field}: {msg}", [{"loc": ["body", field, *loc], "msg": msg}])


def _rows(value, field: str, limits: ServeLimits) -> np.ndarray:
    bert = field == "text_bert"
    lead = "3" if bert else "L"
    width = None if bert else limits.width(field)
    want = "(3, Lt) (ids, mask, segments)" if bert else f"({lead}, {width})"
    if not isinstance(value, list) or not value or not isinstance(value[0], list):
        got = f"a flat list of {len(value)} values" if isinstance(value, list) and value else \
            ("an empty list" if value == [] else type(value).__name__)
        raise _fail(field, f"expected rank 2 {want}, got {got}")
    try:
        rows = (_IDS if bert else _ROWS).validate_python(value, strict=True)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        detail = [{"loc": ["body", field, *err["loc"]], "msg": err["msg"]} for err in errs[:MAX_ERRORS]]
        more = f" (and {len(errs) - MAX_ERRORS} more errors)" if len(errs) > MAX_ERRORS else ""
        first = errs[0]
        raise PredictError(f"{field}: {first['msg']} at {list(first['loc'])}{more}", detail) from None
    n = len(rows[0])
    if bert:
        if len(rows) != 3 or len({len(r) for r in rows}) != 1 or n == 0:
            raise _fail(field, f"expected 3 rows of one length >= 1, got lengths {[len(r) for r in rows]}")
    else:
        for i, r in enumerate(rows):
            if len(r) != width:
                raise _fail(field, f"expected {width} values per step, got {len(r)} at step {i}", (i,))
        n = len(rows)
    if n > limits.max_length:
        raise _fail(field, f"expected at most {limits.max_length} steps (--max-length), got {n}")
    if bert:
        return np.array(rows, np.int64)
    a = np.array(rows, np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        bad = [int(i) for i in np.argwhere(~finite)[0]]
        raise _fail(field, f"expected finite values, got {a[tuple(bad)]} at {bad}", tuple(bad))
    if np.abs(a).max() > np.finfo(np.float32).max:
        raise _fail(field, "values beyond float32's range")
    return a.astype(np.float32)


def parse_predict(body: bytes, limits: ServeLimits) -> dict:
    """One sample dict for ``Predictor.predict`` of a ``POST /predict`` body."""
    obj = _json(body, "body")
    if not isinstance(obj, dict):
        raise PredictError("body: expected a JSON object of modalities", [{"loc": ["body"], "msg": "expected an object"}])
    text = "text_bert" if limits.bert else "text"
    other = "text" if limits.bert else "text_bert"
    sample = {}
    for field in (text, "audio", "vision"):
        if obj.get(field) is None:
            hint = f" (this model takes {text}, not {other})" if field == text and other in obj else ""
            raise _fail(field, f"field required{hint}")
        sample[field] = _rows(obj[field], field, limits)
    return sample


__all__ = ["PredictError", "parse_predict"]
