"""``msa-fast serve``: a :class:`~msa_fast.inference.Predictor` behind HTTP, on LitServe.

- ``POST /predict`` with one sample as JSON, ``{"text": [[...768 floats], ...], "audio":
  [[...da], ...], "vision": [[...dv], ...]}`` (``text_bert`` ``[[ids], [mask], [segments]]``
  instead of ``text`` for a model on BERT ids) -> ``{"sentiment": float, "class_7": int}``,
  ``class_7 = round(clip(sentiment, -3, 3))`` (MMSA's 7-class label).
- ``GET /health`` -> ``ok`` (LitServe's health check: 200 once the worker has loaded the model).
- Dynamic batching: LitServe gathers up to ``max_batch`` requests or waits ``batch_timeout``
  seconds, and the batch goes through one ``Predictor.predict`` call (its batch buckets).

Validation happens in the HTTP process, before a request is queued: the body is parsed into
:class:`PredictRequest` (pydantic) whose validators check every modality is present, numeric
and finite, of rank 2, of the checkpoint's width and at most ``max_length`` steps long. FastAPI
answers a failure with 422 and ``{"detail": [{"loc": ["body", "<field>"], "msg": ...}]}``, so a
malformed request never reaches (nor fails) a batch of good ones, and the server keeps serving.
The widths travel to the HTTP worker processes in the environment (``MSA_FAST_SERVE_LIMITS``).
This module imports ``litserve`` (the ``serve`` extra); :mod:`msa_fast.inference` does not.

Cost of a request (one MOSI sample, 50 x (768 + 5 + 20) floats, a 0.8 MB body; measured on
the 2-core CPU): the standard library's ``json.loads`` took 21 ms of it, so the HTTP process
parses JSON with pydantic-core's parser instead (:func:`pydantic_core.from_json`, 3 ms, the same
Python objects; a parse error is still FastAPI's 422 ``json_invalid``), and each validated
modality is handed on as a float32 ``numpy`` array rather than a list of 38 400 Python floats,
which LitServe's queues (a ``multiprocessing.Manager``: pickled twice each way) and the
Predictor's collation would otherwise copy float by float.
"""


# no `from __future__ import annotations`: LitServe hands decode_request's annotation to
# FastAPI, which must see the class itself (a string makes it a query parameter)
import functools
import json
import os

import litserve as ls
import numpy as np
import pydantic_core
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from starlette.requests import Request

LIMITS_ENV = "MSA_FAST_SERVE_LIMITS"


def _limits() -> dict:
    raw = os.environ.get(LIMITS_ENV)
    if not raw:
        raise ValueError(f"server not configured ({LIMITS_ENV} unset)")
    return _parse_limits(raw)


@functools.lru_cache(maxsize=4)
def _parse_limits(raw: str) -> dict:
    return json.loads(raw)


async def _fast_json(self: Request):
    """Starlette's ``Request.json`` with pydantic-core's JSON parser (see the module docstring);
    invalid JSON raises ``json.JSONDecodeError`` as before, which FastAPI answers with 422."""
    if not hasattr(self, "_json"):
        body = await self.body()
        try:
            self._json = pydantic_core.from_json(body, allow_inf_nan=True)
        except ValueError as e:
            raise json.JSONDecodeError(str(e), body.decode("utf-8", "replace"), 0) from None
    return self._json


# this module is imported only by the server (and by its HTTP worker processes, which unpickle
# the LitAPI): the patch never reaches a process that does not serve
Request.json = _fast_json


class PredictRequest(BaseModel):
    """One sample's modalities as nested lists (the body of ``POST /predict``)."""

    model_config = ConfigDict(extra="ignore")

    text: list[list[float]] | None = None
    text_bert: list[list[float]] | None = None
    audio: list[list[float]]
    vision: list[list[float]]

    @field_validator("text", "text_bert", "audio", "vision")
    @classmethod
    def _shape(cls, value, info):
        if value is None:
            return value
        lim, name = _limits(), info.field_name
        if name == "text_bert":
            if len(value) != 3:
                raise ValueError(f"expected 3 rows (ids, mask, segments), got {len(value)}")
            lengths = {len(r) for r in value}
            if len(lengths) != 1 or 0 in lengths:
                raise ValueError(f"expected 3 rows of one length >= 1, got lengths {sorted(lengths)}")
            n = lengths.pop()
        else:
            width = lim[name]
            if not value:
                raise ValueError(f"expected at least one step of {width} values, got none")
            for i, row in enumerate(value):
                if len(row) != width:
                    raise ValueError(f"expected {width} values per step, got {len(row)} at step {i}")
            n = len(value)
        if n > lim["max_length"]:
            raise ValueError(f"expected at most {lim['max_length']} steps, got {n}")
        if name == "text_bert":
            return value
        # float64 first: a finite double beyond float32's range is an error, not an inf
        arr = np.asarray(value, dtype=np.float64)
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(f"expected finite values, got NaN or inf at step {int(np.argwhere(~finite)[0, 0])}")
        if np.abs(arr).max() > np.finfo(np.float32).max:
            raise ValueError("expected values within float32 range")
        return arr.astype(np.float32)

    @model_validator(mode="after")
    def _text(self):
        want = "text_bert" if _limits().get("text_input") == "bert" else "text"
        other = "text" if want == "text_bert" else "text_bert"
        if getattr(self, want) is None:
            raise ValueError(f"{want}: field required (this model takes {want}"
                             + (f", not {other}" if getattr(self, other) is not None else "") + ")")
        return self


async def _validation_error(request, exc) -> JSONResponse:
    """422 with ``{"detail": [{"type", "loc", "msg"}]}``: FastAPI's default also echoes each
    failing field's input, which is up to megabytes of floats, and a NaN in it made the JSON
    encoder fail (a 500 instead of the 422)."""
    detail = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail)})


def _class_7(x: float) -> int:
    return int(round(min(3.0, max(-3.0, x))))


class PredictorAPI(ls.LitAPI):
    """The LitAPI of a run directory: a Predictor per worker, a batch per Predictor call."""

    def __init__(self, checkpoint: str, device: str = "auto", backend: str = "auto",
                 compile="auto", max_batch: int = 64, batch_timeout: float = 0.005,
                 runtime: str = "auto"):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout)
        self.checkpoint, self.device_name, self.backend = checkpoint, device, backend
        self.compile_flag, self.max_batch, self.runtime = compile, max_batch, runtime

    def setup(self, device):
        from msa_fast.inference.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(self.checkpoint, device=self.device_name,
                                                   backend=self.backend, max_batch=self.max_batch,
                                                   compile=self.compile_flag, runtime=self.runtime)
        self.text_key = "text_bert" if self.predictor.dims["text_input"] == "bert" else "text"

    def decode_request(self, request: PredictRequest):
        return {self.text_key: getattr(request, self.text_key), "audio": request.audio,
                "vision": request.vision}

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x):
        return self.predictor.predict(x).tolist()

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"sentiment": float(output), "class_7": _class_7(float(output))}


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          batch_timeout: float = 0.005, device: str = "auto", backend: str = "auto",
          compile="auto", max_length: int | None = None, runtime: str = "auto") -> None:
    """Run the server until interrupted (one worker; see the module docstring)."""
    import torch

    from msa_fast.inference.predictor import DEFAULT_LENGTH_BUCKETS, _check_dims
    from msa_fast.train.checkpoint import read_state

    state = read_state(checkpoint)
    dims = _check_dims(state["dims"])
    os.environ[LIMITS_ENV] = json.dumps({
        "text": dims["text"], "audio": dims["audio"], "vision": dims["vision"],
        "text_input": dims["text_input"], "max_length": max_length or max(DEFAULT_LENGTH_BUCKETS)})
    api = PredictorAPI(checkpoint, device, backend, compile, max_batch, batch_timeout, runtime)
    accel = "cuda" if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda") \
        else "cpu"
    server = ls.LitServer(api, accelerator=accel, devices=1, workers_per_device=1, timeout=60)
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1,
               log_level="warning")


__all__ = ["LIMITS_ENV", "PredictRequest", "PredictorAPI", "serve"]
