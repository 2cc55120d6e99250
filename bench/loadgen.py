"""A small gRPC load generator (grpc.aio): closed loop at fixed concurrency, or open loop at a fixed rate.

Used by the benchmarks; every run is bounded in count and time and targets loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

Call = Callable[[int], Awaitable[object]]
T = TypeVar("T")


def rotate(items: Sequence[T], by: int) -> list[T]:
    """`items` starting at position `by` (wrapping): compared variants run in another order each
    repetition, so drift on a shared machine hits them all alike."""
    by %= len(items)
    return [*items[by:], *items[:by]]


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    extra: list[object] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99(self) -> float:
        return self.percentile(99)


async def _timed(call: Call, n: int, result: LoadResult) -> None:
    started = time.perf_counter()
    try:
        response = await call(n)
    except grpc.aio.AioRpcError as exc:
        result.errors[exc.code().name] = result.errors.get(exc.code().name, 0) + 1
        return
    result.latencies_ms.append((time.perf_counter() - started) * 1e3)
    result.extra.append(response)


async def closed_loop(call: Call, *, concurrency: int, requests: int, max_seconds: float = 120) -> LoadResult:
    """`concurrency` workers, each sending its next request when the last one returns."""
    result = LoadResult()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        for n in counter:
            if time.monotonic() > deadline:
                return
            await _timed(call, n, result)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started
    return result


async def open_loop(call: Call, *, rate: float, seconds: float, max_in_flight: int = 1000) -> LoadResult:
    """Requests start on a fixed schedule (rate per second) whether or not earlier ones returned."""
    result = LoadResult()
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    total = int(rate * seconds)
    for n in range(total):
        target = started + n / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            result.errors["CLIENT_OVERLOADED"] = result.errors.get("CLIENT_OVERLOADED", 0) + 1
            continue
        task = asyncio.create_task(_timed(call, n, result))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    result.wall_s = time.perf_counter() - started
    return result


@contextlib.asynccontextmanager
async def served_faq(settings: Any, encoder: Any) -> AsyncIterator[tuple[Any, Any, int]]:
    """The real service on loopback with the shipped FAQ upserted through gRPC:
    yields (running server, SearchService stub, number of documents)."""
    from semsearch.v1 import search_pb2 as pb
    from semsearch.v1 import search_pb2_grpc
    from service.demo import read_corpus, shipped_corpus, to_document
    from service.server import start_server

    running = await start_server(settings)
    try:
        await running.load(encoder)
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            documents = [to_document(row) for row in read_corpus(shipped_corpus())]
            await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents), timeout=300)
            yield running, stub, len(documents)
    finally:
        await running.stop(grace_s=1)
