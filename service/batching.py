"""Micro-batching: concurrent Search calls share one encoder forward pass.

Callers await `encode(texts)`; a single worker takes whatever is queued (up to `max_batch` texts,
waiting at most `max_wait_s` for more once one arrives), encodes it in a thread, and resolves each
caller's future with its rows. A full queue answers at once with OverloadedError.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import structlog

from semsearch.errors import OverloadedError
from semsearch.metrics import ENCODER_BATCH_SIZE, ENCODER_LATENCY, ENCODER_QUEUE_DEPTH, ENCODER_QUEUE_WAIT

log = structlog.get_logger(__name__)

EncodeFn = Callable[..., np.ndarray]  # (texts, *, timeout_s) -> vectors


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # time.monotonic() by which the caller gives up
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    texts: int = 0
    max_batch_seen: int = 0


class MicroBatcher:
    def __init__(
        self, encode_fn: EncodeFn, *, max_batch: int = 32, max_wait_s: float = 0.002, queue_size: int = 1024,
    ) -> None:
        self._encode_fn = encode_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._worker: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def encode(self, texts: Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = _Pending(list(texts), loop.create_future(), deadline)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise OverloadedError("encoder queue is full; retry with backoff") from None
        ENCODER_QUEUE_DEPTH.set(self._queue.qsize())
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            size = len(first.texts)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                        self._queue.get(), timeout
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(item)
                size += len(item.texts)
            # Callers that gave up (cancelled, deadline passed) cost no encoder time.
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            texts = [text for p in live for text in p.texts]
            now = time.perf_counter()
            for p in live:
                ENCODER_QUEUE_WAIT.observe(now - p.enqueued_at)
            ENCODER_BATCH_SIZE.observe(len(texts))
            ENCODER_QUEUE_DEPTH.set(self._queue.qsize())
            # The batch may run as long as its most patient caller waits; others leave on their own.
            deadlines = [p.deadline for p in live if p.deadline is not None]
            timeout_s = None if len(deadlines) < len(live) else max(0.0, max(deadlines) - time.monotonic())
            call = functools.partial(self._encode_fn, texts, timeout_s=timeout_s)
            try:
                with ENCODER_LATENCY.labels(kind="query").time():
                    vectors = await loop.run_in_executor(self._executor, call)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.texts += len(texts)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(texts))
            offset = 0
            for p in live:
                rows = vectors[offset : offset + len(p.texts)]
                offset += len(p.texts)
                if not p.future.done():
                    p.future.set_result(rows)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(OverloadedError("service is shutting down"))
        self._executor.shutdown(wait=True)
