"""``msa-fast serve``: a :class:`~msa_fast.inference.Predictor` behind HTTP (Starlette on
uvicorn, the ``serve`` extra).

Endpoints:

- the Open Inference Protocol (KServe v2) REST API, with the binary tensor data extension
  (:mod:`~msa_fast.inference.v2_protocol`), so that the stock clients (``tritonclient.http``,
  KServe's) call it unchanged: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
  ``GET /v2/models/{name}`` (inputs, outputs, datatypes, shapes), ``GET /v2/models/{name}/ready``,
  ``POST /v2/models/{name}/infer`` (also under ``/versions/1``); ``name`` is the checkpoint's
  model name unless ``--name`` says otherwise, and one request may carry a whole batch;
- ``POST /predict`` (one sample as JSON, :mod:`~msa_fast.inference.predict_json`) and
  ``GET /health`` (``ok`` once ready), for curl;
- ``GET /metrics``: Prometheus (:mod:`~msa_fast.inference.serve_metrics`).

Choices, and why:

- **No LitServe.** Its worker process sits behind ``multiprocessing.Manager`` queues that
  pickled every request twice each way (one MOSI sample: 30-50 ms at one client, 20-35
  requests/s at 8-32 clients, while the model needs 1-2 ms). Here the requests stay in the
  process: the event loop parses them and a :class:`~msa_fast.inference.batcher.MicroBatcher`
  runs them in batches on one worker thread (the runtimes release the GIL).
- **Limits before work.** A body over ``--max-body`` is refused from its ``Content-Length``
  (413) before it is read (a chunked one as soon as it passes the limit); parsing a body
  larger than a few tens of microseconds of work runs on a thread, so ``/health`` and the
  other requests stay fast while a big body is parsed.
- **Lifecycle.** The checkpoint is loaded and the port bound before the server starts, so
  either failure is a one-line error (exit 2). ``/v2/health/ready`` turns 200 only after the
  ``--warmup`` buckets ran (built, compiled, exported); requests sent earlier wait for it.
  ``SIGTERM`` / ``SIGINT``: the listening socket closes, requests in flight are answered
  (at most :data:`GRACE_S` seconds), the worker thread ends, exit 0 without a traceback.
- **--workers N** (many-core hosts): N spawned processes accept on one listening socket,
  each with its own Predictor and metrics; the parent only forwards signals and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from msa_fast.inference.batcher import MicroBatcher
from msa_fast.inference.predict_json import PredictError, parse_predict
from msa_fast.inference.serve_limits import ServeLimits, data_lengths, default_max_body
from msa_fast.inference.serve_metrics import ServeMetrics
from msa_fast.inference.v2_protocol import (
    ProtocolError,
    class_7,
    encode_infer,
    model_metadata,
    parse_infer,
)

_LOG = logging.getLogger("msa_fast.serve")
GRACE_S = 8.0  # in-flight requests get this long after SIGTERM; the process exits within 10 s
# parse on the event loop below these sizes (~50 us of work), on a thread above
INLINE_JSON_BYTES = 16 * 1024
INLINE_BINARY_BYTES = 256 * 1024
PLATFORM = "msa_fast_predictor"


class ServeError(ValueError):
    """A setup problem of ``msa-fast serve`` (the CLI prints it in one line, exit 2)."""


# -- configuration ---------------------------------------------------------------------------

@dataclass
class ServeConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    batch_timeout: float = 0.005
    device: str = "auto"
    backend: str = "auto"
    compile: object = "auto"
    max_length: int | None = None
    runtime: str = "auto"
    name: str | None = None
    workers: int = 1
    max_body: int | None = None
    warmup: str = "1,max"


def parse_warmup(spec: str, max_batch: int, lengths: tuple[int, int, int], max_length: int) -> list:
    """``--warmup``: ``none``, or comma-separated ``B``, ``BxL`` or ``BxLt/La/Lv`` (``B`` a
    number or ``max``; lengths default to the checkpoint's data lengths) -> ``[(B, (Lt, La,
    Lv))]``."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(max|\d+)(?:x(\d+(?:/\d+/\d+)?))?", item.strip())
        try:
            if m is None:
                raise ValueError(item)
            b, ls = m.group(1), m.group(2)
            n = max_batch if b == "max" else int(b)
            Ls = tuple(min(int(x), max_length) for x in ls.split("/")) if ls else \
                tuple(min(x, max_length) for x in lengths)
        except ValueError:
            raise ServeError(f"--warmup: expected B, BxL or BxLt/La/Lv items (B a number or 'max'), "
                             f"got {item!r}") from None
        if len(Ls) == 1:
            Ls = Ls * 3
        if len(Ls) != 3 or n < 1 or min(Ls) < 1:
            raise ServeError(f"--warmup: expected a positive batch and 1 or 3 positive lengths, got {item!r}")
        out.append((min(n, max_batch), Ls))
    return out


def _warmup_samples(n: int, Ls: tuple, limits: ServeLimits) -> list[dict]:
    g = np.random.default_rng(0)
    text = np.ones((3, Ls[0]), np.int64) if limits.bert else \
        g.standard_normal((Ls[0], limits.text), dtype=np.float32)
    s = {"text_bert" if limits.bert else "text": text,
         "audio": g.standard_normal((Ls[1], limits.audio), dtype=np.float32),
         "vision": g.standard_normal((Ls[2], limits.vision), dtype=np.float32)}
    return [s] * n


def load(cfg: ServeConfig):
    """The Predictor and limits of ``cfg`` (raises ``ValueError`` naming the problem)."""
    from msa_fast.inference.predictor import DEFAULT_LENGTH_BUCKETS, Predictor

    pred = Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device, backend=cfg.backend,
                                     max_batch=cfg.max_batch, compile=cfg.compile, runtime=cfg.runtime)
    max_length = cfg.max_length or max(DEFAULT_LENGTH_BUCKETS)
    d = pred.dims
    limits = ServeLimits(d["text"], d["audio"], d["vision"], d["text_input"], max_length, cfg.max_batch,
                         cfg.max_body or default_max_body(d, max_length, cfg.max_batch))
    return pred, limits


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a :class:`ServeError` naming the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise ServeError(f"--port: {host}:{port} {why}") from None
    sock.set_inheritable(True)
    return sock


# -- the app ---------------------------------------------------------------------------------

def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class ServeApp:
    """The routes of one worker process around one Predictor."""

    def __init__(self, predictor, limits: ServeLimits, name: str, max_batch: int,
                 batch_timeout: float, warmup: list, on_warmup_failure=None):
        self.predictor, self.limits, self.name = predictor, limits, name
        self.warmup_buckets = warmup
        self.on_warmup_failure = on_warmup_failure
        self.batcher = MicroBatcher(self._predict, max_batch, batch_timeout, warmup=self._warmup,
                                    on_batch=lambda n: self.metrics.batch_size.observe(n))
        self.metrics = ServeMetrics(self.batcher.depth)
        self.metadata = model_metadata(name, limits, PLATFORM)
        v2 = "/v2/models/{name}"
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route(v2, self.model_meta, methods=["GET"]),
            Route(v2 + "/versions/{version}", self.model_meta, methods=["GET"]),
            Route(v2 + "/ready", self.model_ready, methods=["GET"]),
            Route(v2 + "/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route(v2 + "/infer", self.infer, methods=["POST"]),
            Route(v2 + "/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/predict", self.predict, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan,
                             exception_handlers={404: self._http_error, 405: self._http_error})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.batcher.start()
        watch = asyncio.create_task(self._watch_warmup())
        try:
            yield
        finally:
            watch.cancel()
            # uvicorn calls this after the connections in flight were answered, so the queue is
            # empty; a warm-up still running is not waited for (exit within 10 s of SIGTERM)
            await run_in_threadpool(self.batcher.stop, 1.0)

    async def _watch_warmup(self):
        while not self.batcher.ready.is_set() and self.batcher.failed is None:
            await asyncio.sleep(0.05)
        if self.batcher.failed is not None and self.on_warmup_failure is not None:
            self.on_warmup_failure(self.batcher.failed)
        elif self.batcher.ready.is_set():
            _LOG.warning("msa-fast serve: ready (model %r)", self.name)

    async def _http_error(self, request, exc):
        """An unknown path or method in the protocol's error shape, not Starlette's text."""
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    # -- the model -------------------------------------------------------------------------

    def _predict(self, samples: list) -> np.ndarray:
        return self.predictor.predict(samples).numpy()

    def _warmup(self) -> None:
        for n, Ls in self.warmup_buckets:
            self._predict(_warmup_samples(n, Ls, self.limits))

    # -- helpers ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        cl = request.headers.get("content-length")
        limit = self.limits.max_body
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise ProtocolError(f"Content-Length: not an integer ({cl!r})") from None
            if n > limit:
                raise ProtocolError(f"body: {n} bytes, over the limit of {limit} (--max-body)", 413)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise ProtocolError("Content-Encoding: compressed bodies are not supported", 415)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"body: over the limit of {limit} bytes (--max-body)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_name(self, request: Request) -> None:
        name = request.path_params["name"]
        if name != self.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.name!r}", 404)
        version = request.path_params.get("version")
        if version is not None and version != "1":
            raise ProtocolError(f"model {name!r} has no version {version!r} (it has '1')", 404)

    async def _timed(self, endpoint: str, handler, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
        except PredictError as e:
            resp = _error(e.status, str(e), detail=e.detail)
        except ProtocolError as e:
            resp = _error(e.status, str(e))
        except ClientDisconnect:
            resp = Response(status_code=499)
        except ValueError as e:  # the Predictor's own checks
            resp = _error(400, str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - answered, logged, the server goes on
            _LOG.exception("internal error")
            resp = _error(500, f"internal error: {type(e).__name__}: {e}")
        self.metrics.observe(endpoint, resp.status_code, time.perf_counter() - t0)
        return resp

    # -- routes ----------------------------------------------------------------------------

    async def live(self, request):
        return JSONResponse({"live": True})

    async def ready(self, request):
        if self.batcher.ready.is_set():
            return JSONResponse({"ready": True})
        return _error(503, "warming up" if self.batcher.failed is None else f"warm-up failed: {self.batcher.failed}")

    async def health(self, request):
        if self.batcher.ready.is_set():
            return Response("ok", media_type="text/plain")
        return Response("warming up", status_code=503, media_type="text/plain")

    async def server_metadata(self, request):
        from msa_fast import __version__

        return JSONResponse({"name": "msa-fast", "version": __version__,
                             "extensions": ["binary_tensor_data"]})

    async def model_meta(self, request):
        async def handler(request):
            self._check_name(request)
            return JSONResponse(self.metadata)
        return await self._timed("metadata", handler, request)

    async def model_ready(self, request):
        async def handler(request):
            self._check_name(request)
            return await self.ready(request)
        return await self._timed("model_ready", handler, request)

    async def prometheus(self, request):
        body, ctype = self.metrics.render()
        return Response(body, media_type=ctype)

    async def _parse(self, parse, body: bytes, inline: int, *args):
        self.batcher.arriving += 1
        try:
            if len(body) <= inline:
                return parse(body, *args)
            return await run_in_threadpool(parse, body, *args)
        finally:
            self.batcher.arriving -= 1

    async def infer(self, request):
        async def handler(request):
            self._check_name(request)
            hl = request.headers.get("inference-header-content-length")
            self.batcher.arriving += 1  # counted from the first byte: the batcher may wait for it
            try:
                body = await self._body(request)
            finally:
                self.batcher.arriving -= 1
            req = await self._parse(parse_infer, body, INLINE_JSON_BYTES if hl is None else INLINE_BINARY_BYTES,
                                    hl, self.limits)
            pred = await self.batcher.submit(req.samples)
            content, head = encode_infer(self.name, req, pred)
            if head is None:
                return Response(content, media_type="application/json")
            return Response(content, media_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(head)})
        return await self._timed("infer", handler, request)

    async def predict(self, request):
        async def handler(request):
            self.batcher.arriving += 1
            try:
                body = await self._body(request)
            finally:
                self.batcher.arriving -= 1
            sample = await self._parse(parse_predict, body, INLINE_JSON_BYTES, self.limits)
            pred = await self.batcher.submit([sample])
            x = float(pred[0])
            return JSONResponse({"sentiment": x, "class_7": int(class_7(pred[:1])[0])})
        return await self._timed("predict", handler, request)


# -- processes -------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn's server without its re-raise of the signal after a graceful shutdown (which
    turned Ctrl-C into a KeyboardInterrupt traceback): a signal is a normal exit here."""

    @contextlib.contextmanager
    def capture_signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self.handle_exit) for s in handled}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _uvicorn_config(app, cfg: ServeConfig) -> uvicorn.Config:
    import importlib.util

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=GRACE_S,
                          http="httptools" if importlib.util.find_spec("httptools") else "h11",
                          loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio")


def _run_one(cfg: ServeConfig, sock: socket.socket, predictor=None, limits=None) -> int:
    """One worker: Predictor, app and uvicorn on the listening socket ``sock``."""
    if predictor is None:
        predictor, limits = load(cfg)
    warmup = parse_warmup(cfg.warmup, cfg.max_batch, data_lengths(predictor.state), limits.max_length)
    state = {"code": 0}
    server: _Server | None = None

    def failed(err):
        state["code"] = 1
        print(f"msa-fast: error: warm-up failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        server.should_exit = True

    name = cfg.name or predictor.model_name
    app = ServeApp(predictor, limits, name, cfg.max_batch, cfg.batch_timeout, warmup, failed)
    server = _Server(_uvicorn_config(app.app, cfg))
    server.run(sockets=[sock])
    return state["code"]


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so that a
    killed ``--workers`` parent leaves no worker listening on the port."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_main(cfg_dict: dict, sock: socket.socket) -> None:
    """The entry point of a spawned ``--workers`` process."""
    _die_with_parent()
    code = 1
    try:
        code = _run_one(ServeConfig(**cfg_dict), sock)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"msa-fast: error: {str(e).splitlines()[0]}", file=sys.stderr)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def _run_many(cfg: ServeConfig, sock: socket.socket) -> int:
    """``--workers N``: N spawned processes on one listening socket; this process forwards
    SIGTERM / SIGINT to them and waits (a worker that is still alive after the grace period is
    killed, so none is ever left behind)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(asdict(cfg), sock), name=f"msa-fast-serve-{i}")
             for i in range(cfg.workers)]
    stopping = {"at": None}

    def stop(sig, frame):
        if stopping["at"] is None:
            stopping["at"] = time.monotonic()
            for p in procs:
                if p.pid is not None and p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        sock.close()  # the workers hold it now
        code = 0
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(0.1)
                if p.exitcode not in (None, 0) and stopping["at"] is None:
                    code = 1  # a worker failed: stop the others
                    stop(None, None)
            if stopping["at"] is not None and time.monotonic() - stopping["at"] > GRACE_S + 1:
                for p in procs:
                    if p.is_alive():
                        p.kill()
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          batch_timeout: float = 0.005, device: str = "auto", backend: str = "auto",
          compile="auto", max_length: int | None = None, runtime: str = "auto",
          name: str | None = None, workers: int = 1, max_body: int | None = None,
          warmup: str = "1,max") -> int:
    """Run the server until SIGTERM / SIGINT (see the module docstring); the exit code.

    The checkpoint is loaded, the warm-up spec checked and the port bound first: any failure
    raises :class:`ServeError` / ``ValueError`` before anything listens."""
    cfg = ServeConfig(checkpoint, host, port, max_batch, batch_timeout, device, backend, compile,
                      max_length, runtime, name, workers, max_body, warmup)
    predictor, limits = load(cfg)
    parse_warmup(cfg.warmup, cfg.max_batch, data_lengths(predictor.state), limits.max_length)
    sock = bind(host, port)
    print(f"msa-fast serve: {cfg.name or predictor.model_name} on http://{host}:{port} "
          f"(POST /v2/models/{cfg.name or predictor.model_name}/infer, POST /predict; "
          f"{workers} worker{'s' if workers > 1 else ''}; max body {limits.max_body} bytes)",
          file=sys.stderr, flush=True)
    if workers > 1:
        del predictor  # each worker loads its own
        return _run_many(cfg, sock)
    return _run_one(cfg, sock, predictor, limits)


__all__ = ["GRACE_S", "ServeApp", "ServeConfig", "ServeError", "bind", "load", "parse_warmup", "serve"]

