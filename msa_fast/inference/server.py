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
"""


# no `from __future__ import annotations`: LitServe hands decode_request's annotation to
# FastAPI, which must see the class itself (a string makes it a query parameter)
import json
import math
import os

import litserve as ls
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

LIMITS_ENV = "MSA_FAST_SERVE_LIMITS"


def _limits() -> dict:
    raw = os.environ.get(LIMITS_ENV)
    if not raw:
        raise ValueError(f"server not configured ({LIMITS_ENV} unset)")
    return json.loads(raw)


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
                if not all(math.isfinite(x) for x in row):
                    raise ValueError(f"expected finite values, got NaN or inf at step {i}")
            n = len(value)
        if n > lim["max_length"]:
            raise ValueError(f"expected at most {lim['max_length']} steps, got {n}")
        return value

    @model_validator(mode="after")
    def _text(self):
        want = "text_bert" if _limits().get("text_input") == "bert" else "text"
        other = "text" if want == "text_bert" else "text_bert"
        if getattr(self, want) is None:
            raise ValueError(f"{want}: field required (this model takes {want}"
                             + (f", not {other}" if getattr(self, other) is not None else "") + ")")
        return self


def _class_7(x: float) -> int:
    return int(round(min(3.0, max(-3.0, x))))


class PredictorAPI(ls.LitAPI):
    """The LitAPI of a run directory: a Predictor per worker, a batch per Predictor call."""

    def __init__(self, checkpoint: str, device: str = "auto", backend: str = "auto",
                 compile="auto", max_batch: int = 64, batch_timeout: float = 0.005):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout)
        self.checkpoint, self.device_name, self.backend = checkpoint, device, backend
        self.compile_flag, self.max_batch = compile, max_batch

    def setup(self, device):
        from msa_fast.inference.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(self.checkpoint, device=self.device_name,
                                                   backend=self.backend, max_batch=self.max_batch,
                                                   compile=self.compile_flag)
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
          compile="auto", max_length: int | None = None) -> None:
    """Run the server until interrupted (one worker; see the module docstring)."""
    import torch

    from msa_fast.inference.predictor import DEFAULT_LENGTH_BUCKETS, _check_dims
    from msa_fast.train.checkpoint import read_state

    state = read_state(checkpoint)
    dims = _check_dims(state["dims"])
    os.environ[LIMITS_ENV] = json.dumps({
        "text": dims["text"], "audio": dims["audio"], "vision": dims["vision"],
        "text_input": dims["text_input"], "max_length": max_length or max(DEFAULT_LENGTH_BUCKETS)})
    api = PredictorAPI(checkpoint, device, backend, compile, max_batch, batch_timeout)
    accel = "cuda" if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda") \
        else "cpu"
    server = ls.LitServer(api, accelerator=accel, devices=1, workers_per_device=1, timeout=60)
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1,
               log_level="warning")


__all__ = ["LIMITS_ENV", "PredictRequest", "PredictorAPI", "serve"]
