"""The in-process micro-batcher of ``msa-fast serve``: the event loop hands parsed requests to
one worker thread, which runs them through one :class:`~msa_fast.inference.Predictor` in
batches.

Why a thread and not LitServe's worker process: a request then crosses no process boundary
(LitServe's ``multiprocessing.Manager`` queues pickled every request twice each way, 30-50 ms
for a MOSI sample at one client), and the Predictor's runtimes (ONNX Runtime, torch) release
the GIL while they compute, so the event loop keeps parsing and answering meanwhile.

Batching rule (no fixed wait at low load): the worker takes the oldest request, then
everything queued behind it up to ``max_batch`` samples, and waits at most ``batch_timeout``
seconds for more *only while other requests are still arriving* (read, being parsed: the
server counts them in :attr:`MicroBatcher.arriving`). One client so never waits for a batch
that cannot fill; many clients fill batches while the previous batch runs. A request is never
split; one that would overflow the batch opens the next one.

A batch that fails runs again request by request, so that one request's error (a
``ValueError`` from the Predictor's checks) reaches that request alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

_LOG = logging.getLogger("msa_fast.serve")
_STOP = object()


class _Item:
    __slots__ = ("samples", "future", "loop")

    def __init__(self, samples, future, loop):
        self.samples, self.future, self.loop = samples, future, loop


def _deliver(fut: asyncio.Future, value, error) -> None:
    if fut.cancelled():  # the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class MicroBatcher:
    """``submit(samples)`` (awaitable) -> predictions ``(len(samples),)`` float32."""

    def __init__(self, predict: Callable[[list], np.ndarray], max_batch: int, batch_timeout: float,
                 warmup: Callable[[], None] | None = None,
                 on_batch: Callable[[int], None] | None = None):
        self.predict, self.max_batch, self.batch_timeout = predict, max_batch, batch_timeout
        self.warmup, self.on_batch = warmup, on_batch
        self.arriving = 0  # requests read or being parsed, not yet submitted (event loop only)
        self.ready = threading.Event()
        self.failed: BaseException | None = None  # the warm-up's error
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._carry: _Item | None = None
        self._thread = threading.Thread(target=self._run, name="msa-fast-predict", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Answer what is queued, then end the worker thread."""
        self._q.put(_STOP)
        self._thread.join(timeout)

    def depth(self) -> int:
        return self._q.qsize() + (self._carry is not None)

    async def submit(self, samples: list) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put(_Item(samples, fut, loop))
        return await fut

    # -- worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.warmup is not None:
            try:
                self.warmup()
            except BaseException as e:  # noqa: BLE001 - reported by /v2/health/ready and the log
                self.failed = e
                _LOG.error("warm-up failed: %s", e)
                return
        self.ready.set()
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._answer(batch)

    def _gather(self) -> list[_Item] | None:
        first = self._carry or self._q.get()
        self._carry = None
        if first is _STOP:
            return None
        batch, n = [first], len(first.samples)
        deadline = time.perf_counter() + self.batch_timeout
        while n < self.max_batch:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if self.arriving <= 0 or left <= 0:
                    break
                try:
                    item = self._q.get(timeout=left)
                except queue.Empty:
                    break
            if item is _STOP or n + len(item.samples) > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            n += len(item.samples)
        return batch

    def _answer(self, batch: list[_Item]) -> None:
        samples = [s for it in batch for s in it.samples]
        if self.on_batch is not None:
            self.on_batch(len(samples))
        try:
            pred = self.predict(samples)
        except Exception as e:  # noqa: BLE001 - handed to the requests
            if len(batch) > 1:
                for it in batch:
                    self._answer([it])
                return
            batch[0].loop.call_soon_threadsafe(_deliver, batch[0].future, None, e)
            return
        s = 0
        for it in batch:
            k = len(it.samples)
            it.loop.call_soon_threadsafe(_deliver, it.future, pred[s:s + k], None)
            s += k


__all__ = ["MicroBatcher"]
