"""Load test: the highest fixed request rate the service holds (p99 < 200 ms, zero errors), then a soak.

The service runs in its own process (`semsearch serve`, MiniLM on CPU, a temporary Milvus Lite
directory, loopback only), so its memory can be sampled and the load generator (grpc.aio, open loop:
requests start on a fixed schedule whether or not earlier ones returned) does not share its event loop.

1. Start the service, seed the shipped FAQ corpus through UpsertDocuments, wait for health SERVING.
2. Rate search: hold each rate of --rates for --step-seconds; stop at the first failing step
   (p99 >= --p99-ms, or any error). Report the highest passing rate.
3. Soak: hold --soak-rate (default: half the highest passing rate) for --soak-seconds with the same
   query mix plus --upsert-rate UpsertDocuments a second that overwrite a fixed set of ids (so the
   data, and memory, should stay flat); sample the service's RSS (and its child processes') every
   --sample-seconds after a warm-up, and report growth and the least-squares slope of the second half.

The query mix: FAQ questions and random paraphrases of them (SearchDocuments), some with metadata
filters, some BatchSearchDocuments of 3 queries.

    .venv/bin/python bench/bench_load.py --quick          # smoke run: 5 s steps, 60 s soak
    .venv/bin/python bench/bench_load.py                  # 20 s steps, 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from semsearch.encoders.local import STAND_IN_MODEL  # noqa: E402
from semsearch.v1 import search_pb2 as pb  # noqa: E402
from semsearch.v1 import search_pb2_grpc  # noqa: E402
from service.demo import read_corpus, shipped_corpus, to_document  # noqa: E402

MIB = 1024 * 1024
DEFAULT_RATES = "5,10,15,20,25,30,40,50,60,80,100,120,160,200"
PREFIXES = ["", "", "请问", "我想问下", "麻烦问一下", "你好，", "问一下", "急！", "客服你好，", "想咨询一下"]
SUFFIXES = ["", "", "？", "呢", "啊", "？谢谢", "，在线等", "。", "?", "吗"]
EXTRA_QUERIES = ["退钱怎么操作", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
                 "保修期是多久", "会员积分怎么用", "可以分期付款吗", "how do I get a refund", "where is my parcel"]


# --------------------------------------------------------------------------------------- the mix
class QueryMix:
    """Deterministic (seeded) stream of requests: plain searches, filtered searches, batch searches."""

    def __init__(self, rows: list[dict[str, Any]], *, seed: int, filter_share: float, batch_share: float) -> None:
        self.random = random.Random(seed)
        metadata = [row["metadata"] for row in rows if isinstance(row.get("metadata"), dict)]
        self.questions = [str(m["question"]) for m in metadata if m.get("question")] + EXTRA_QUERIES
        self.categories = sorted({str(m["category"]) for m in metadata if "category" in m})
        self.filter_share = filter_share
        self.batch_share = batch_share

    def query_text(self) -> str:
        question = self.random.choice(self.questions)
        roll = self.random.random()
        if roll < 0.4:
            return question  # verbatim FAQ question
        text = question.rstrip("？?。！!")
        if roll < 0.6 and len(text) > 4:  # drop a character (typo-like)
            i = self.random.randrange(len(text))
            text = text[:i] + text[i + 1 :]
        return self.random.choice(PREFIXES) + text + self.random.choice(SUFFIXES)

    def search_request(self, filtered: bool) -> pb.SearchDocumentsRequest:
        filters = []
        if filtered:
            if self.random.random() < 0.5 and self.categories:
                filters.append(pb.MetadataFilter(field="category", operator=pb.FILTER_OPERATOR_EQ,
                                                 value=pb.FilterValue(string_value=self.random.choice(self.categories))))
            else:
                filters.append(pb.MetadataFilter(field="priority", operator=pb.FILTER_OPERATOR_LTE,
                                                 value=pb.FilterValue(int_value=self.random.choice([1, 2]))))
        return pb.SearchDocumentsRequest(query=self.query_text(), top_k=self.random.choice([3, 5, 10]),
                                         filters=filters)

    def next_call(self, stub: search_pb2_grpc.SearchServiceStub,
                  timeout_s: float) -> tuple[str, Callable[[], Awaitable[object]]]:
        roll = self.random.random()
        if roll < self.batch_share:
            batch = pb.BatchSearchDocumentsRequest(requests=[self.search_request(self.random.random() < 0.3)
                                                             for _ in range(3)])
            return "batch", lambda: stub.BatchSearchDocuments(batch, timeout=timeout_s)
        request = self.search_request(roll < self.batch_share + self.filter_share)
        kind = "filtered" if request.filters else "search"
        return kind, lambda: stub.SearchDocuments(request, timeout=timeout_s)


# ---------------------------------------------------------------------------------- measuring
@dataclass
class Window:
    """Outcomes of the requests started in one stretch of time."""

    latencies_ms: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    max_lag_ms: float = 0.0  # how late the generator started a request against its schedule
    # Server-side timing of single searches (SearchDocumentsResponse.timing): where the time goes.
    server_ms: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)
    store_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def p(self, q: float, values: list[float] | None = None) -> float:
        values = self.latencies_ms if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def timed(kind: str, call: Callable[[], Awaitable[object]], window: Window) -> None:
    started = time.perf_counter()
    try:
        response = await call()
    except grpc.aio.AioRpcError as exc:
        window.errors[exc.code().name] = window.errors.get(exc.code().name, 0) + 1
        return
    except Exception as exc:  # count it, never lose it
        window.errors[type(exc).__name__] = window.errors.get(type(exc).__name__, 0) + 1
        return
    ms = (time.perf_counter() - started) * 1e3
    window.latencies_ms.append(ms)
    window.by_kind.setdefault(kind, []).append(ms)
    if isinstance(response, pb.SearchDocumentsResponse):
        window.server_ms.append(response.timing.total_ms)
        window.encode_ms.append(response.timing.encode_ms)
        window.store_ms.append(response.timing.store_ms)


async def open_loop(next_call: Callable[[], tuple[str, Callable[[], Awaitable[object]]]], *, rate: float,
                    seconds: float, window_s: float | None = None, max_in_flight: int = 2000,
                    drain_s: float = 30.0, on_window: Callable[[int, Window], None] | None = None) -> list[Window]:
    """Start requests at `rate`/s for `seconds`; outcomes are grouped by the window they started in."""
    window_s = window_s or seconds
    windows: list[Window] = []
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    total = int(rate * seconds)
    current = Window()
    windows.append(current)
    window_end = window_s
    pending_report: list[tuple[int, Window, float]] = []
    for n in range(total):
        offset = n / rate
        if offset >= window_end:
            pending_report.append((len(windows) - 1, current, time.perf_counter()))
            current = Window()
            windows.append(current)
            window_end += window_s
        delay = started + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            current.max_lag_ms = max(current.max_lag_ms, -delay * 1e3)
        if len(tasks) >= max_in_flight:
            current.errors["CLIENT_OVERLOADED"] = current.errors.get("CLIENT_OVERLOADED", 0) + 1
            current.sent += 1
            continue
        kind, call = next_call()
        task = asyncio.create_task(timed(kind, call, current))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        current.sent += 1
        # A finished window is reported once its requests have had time to return.
        while pending_report and time.perf_counter() - pending_report[0][2] > 10 and on_window:
            index, window, _ = pending_report.pop(0)
            on_window(index, window)
    if tasks:
        await asyncio.wait(tasks, timeout=drain_s)
    for task in tasks:
        task.cancel()
    wall = time.perf_counter() - started
    for window in windows:
        window.wall_s = wall if len(windows) == 1 else window_s
    if on_window:
        for index, window, _ in pending_report:
            on_window(index, window)
        on_window(len(windows) - 1, current)
    return windows


def merge(windows: list[Window]) -> Window:
    out = Window()
    for w in windows:
        out.latencies_ms += w.latencies_ms
        for kind, values in w.by_kind.items():
            out.by_kind.setdefault(kind, []).extend(values)
        for code, count in w.errors.items():
            out.errors[code] = out.errors.get(code, 0) + count
        out.sent += w.sent
        out.max_lag_ms = max(out.max_lag_ms, w.max_lag_ms)
        out.server_ms += w.server_ms
        out.encode_ms += w.encode_ms
        out.store_ms += w.store_ms
        out.wall_s += w.wall_s
    return out


# ------------------------------------------------------------------------------------ the service
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def rss(self) -> tuple[int, int]:
        """(RSS of the service process, RSS of its child processes together), bytes."""
        proc = psutil.Process(self.process.pid)
        own = proc.memory_info().rss
        children = 0
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += child.memory_info().rss
        return own, children

    def cpu_seconds(self) -> float:
        proc = psutil.Process(self.process.pid)
        times = proc.cpu_times()
        total = times.user + times.system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
        return total

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def run_service(args: argparse.Namespace, workdir: Path) -> Iterator[Service]:
    port = free_port()
    log_path = workdir / "service.log"
    env = dict(os.environ, SEMSEARCH_METRICS_PORT="0", SEMSEARCH_COLLECTION="load_bench", PYTHONUNBUFFERED="1")
    if args.server_threads:
        env["SEMSEARCH_TORCH_THREADS"] = str(args.server_threads)
    command = [sys.executable, "-m", "semsearch", "serve", "--model", args.model,
               "--milvus-uri", str(workdir / "milvus.db"), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", args.server_log_level]
    print("service: " + " ".join(command), flush=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT),
                                   start_new_session=True)
    service = Service(process=process, address=f"127.0.0.1:{port}", log_path=log_path)
    try:
        yield service
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # graceful drain
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        # Anything the service left behind (e.g. a Lite child) goes with it.
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()


async def wait_serving(service: Service, channel: grpc.aio.Channel, timeout_s: float) -> float:
    stub = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if service.process.poll() is not None:
            raise RuntimeError(f"the service exited with {service.process.returncode}:\n{service.log_tail()}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the service was not SERVING after {timeout_s:.0f} s:\n{service.log_tail()}")


# -------------------------------------------------------------------------------------- helpers
def slope_per_minute(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (seconds, MiB) points and its standard error, both in MiB per minute."""
    if len(points) < 3:
        return float("nan"), float("nan")
    xs = [t for t, _ in points]
    ys = [v for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan"), float("nan")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residual = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope * 60, (residual / (len(xs) - 2) / sxx) ** 0.5 * 60


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def fmt_errors(errors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"


# ----------------------------------------------------------------------------------------- phases
async def rate_search(args: argparse.Namespace, mix: QueryMix, stub: search_pb2_grpc.SearchServiceStub,
                      service: Service) -> tuple[float | None, list[dict[str, object]]]:
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    print(f"\n## Rate search: each rate held {args.step_seconds:g} s, pass = p99 < {args.p99_ms:g} ms and no errors "
          "(srv p99: server-side total_ms of single searches)")
    header = (f"| {'rate':>5} | {'sent':>5} | {'ok':>5} | {'errors':>6} | {'p50 ms':>7} | {'p99 ms':>7} | "
              f"{'srv p99 ms':>10} | {'achieved rps':>12} | {'max lag ms':>10} | {'svc CPU %':>9} | {'load':>5} | "
              "result |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    best: float | None = None
    rows: list[dict[str, object]] = []
    for rate in rates:
        cpu_before = service.cpu_seconds()
        [window] = await open_loop(lambda: mix.next_call(stub, args.timeout_s), rate=rate,
                                   seconds=args.step_seconds, drain_s=args.timeout_s + 5)
        cpu = (service.cpu_seconds() - cpu_before) / window.wall_s * 100
        passed = window.error_count == 0 and window.ok > 0 and window.p(99) < args.p99_ms
        achieved = window.ok / window.wall_s
        print(f"| {rate:>5g} | {window.sent:>5} | {window.ok:>5} | {window.error_count:>6} | {window.p(50):>7.1f} | "
              f"{window.p(99):>7.1f} | {window.p(99, window.server_ms):>10.1f} | {achieved:>12.1f} | "
              f"{window.max_lag_ms:>10.1f} | {cpu:>9.0f} | {load_average():>5} | {'pass' if passed else 'FAIL'} |",
              flush=True)
        rows.append({"rate": rate, "sent": window.sent, "ok": window.ok, "errors": window.errors,
                     "p50_ms": window.p(50), "p99_ms": window.p(99), "achieved_rps": achieved,
                     "max_lag_ms": window.max_lag_ms, "service_cpu_pct": cpu, "passed": passed,
                     "p99_by_kind": {k: window.p(99, v) for k, v in window.by_kind.items()}})
        if window.errors:
            print(f"  errors: {fmt_errors(window.errors)}")
        rows[-1].update(server_p99_ms=window.p(99, window.server_ms), encode_p99_ms=window.p(99, window.encode_ms),
                        store_p99_ms=window.p(99, window.store_ms))
        if not passed:
            break
        best = rate
        await asyncio.sleep(args.pause_seconds)  # let the queue drain before the next step
    print(f"\nhighest passing rate: {best if best is not None else 'none'} rps "
          f"(p99 < {args.p99_ms:g} ms, zero errors, {args.step_seconds:g} s a step)")
    return best, rows


async def soak(args: argparse.Namespace, rate: float, mix: QueryMix, stub: search_pb2_grpc.SearchServiceStub,
               service: Service) -> dict[str, object]:
    print(f"\n## Soak: {rate:g} rps query mix + {args.upsert_rate:g} UpsertDocuments/s over {args.upsert_ids} "
          "fixed ids, "
          f"{args.soak_seconds:g} s after {args.soak_warmup:g} s of warm-up; RSS every {args.sample_seconds:g} s")
    upsert_window = Window()
    stop = asyncio.Event()
    upsert_random = random.Random(args.seed + 1)
    upsert_texts = [str(row["text"]) for row in read_corpus(shipped_corpus())]

    async def upserts() -> None:
        if args.upsert_rate <= 0:
            return
        n = 0
        started = time.perf_counter()
        while not stop.is_set():
            doc_id = f"soak-{n % args.upsert_ids:03d}"
            # New text each time (so the vector changes), same id: the collection's size stays fixed.
            text = upsert_random.choice(upsert_texts) + f"\n（第{n}次更新）"
            request = pb.UpsertDocumentsRequest(documents=[pb.Document(id=doc_id, text=text)])
            request.documents[0].metadata.update({"category": "soak", "priority": 3})
            await timed("upsert", functools.partial(stub.UpsertDocuments, request, timeout=args.timeout_s),
                        upsert_window)
            upsert_window.sent += 1
            n += 1
            delay = started + n / args.upsert_rate - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    # Warm-up at the soak rate (with upserts), then the measured soak.
    upsert_task = asyncio.create_task(upserts())
    warm = await open_loop(lambda: mix.next_call(stub, args.timeout_s), rate=rate, seconds=args.soak_warmup,
                           drain_s=args.timeout_s + 5)
    print(f"warm-up: {warm[0].ok} ok, {warm[0].error_count} errors, p99 {warm[0].p(99):.1f} ms")

    samples: list[tuple[float, int, int]] = []  # (seconds since start, own RSS, children RSS)
    soak_started = time.perf_counter()

    async def sampler() -> None:
        while not stop.is_set():
            own, children = service.rss()
            samples.append((time.perf_counter() - soak_started, own, children))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.sample_seconds)

    sampler_task = asyncio.create_task(sampler())
    print(f"| {'minute':>6} | {'sent':>5} | {'ok':>5} | {'errors':>6} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'svc RSS MiB':>11} | {'child RSS MiB':>13} | {'load':>5} |")
    print("|-------:|------:|------:|-------:|--------:|--------:|------------:|--------------:|------:|")

    def report(index: int, window: Window) -> None:
        own, children = service.rss()
        print(f"| {index + 1:>6} | {window.sent:>5} | {window.ok:>5} | {window.error_count:>6} | "
              f"{window.p(50):>7.1f} | {window.p(99):>7.1f} | {own / MIB:>11.1f} | {children / MIB:>13.1f} | "
              f"{load_average():>5} |", flush=True)

    cpu_before = service.cpu_seconds()
    windows = await open_loop(lambda: mix.next_call(stub, args.timeout_s), rate=rate, seconds=args.soak_seconds,
                              window_s=min(60.0, args.soak_seconds), drain_s=args.timeout_s + 5, on_window=report)
    soak_wall = time.perf_counter() - soak_started
    cpu = (service.cpu_seconds() - cpu_before) / soak_wall * 100
    own, children = service.rss()
    samples.append((soak_wall, own, children))
    stop.set()
    await asyncio.gather(sampler_task, upsert_task)

    total = merge(windows)
    totals = [(t, (o + c) / MIB) for t, o, c in samples]
    owns = [(t, o / MIB) for t, o, _ in samples]
    half = samples[-1][0] / 2

    def summary(points: list[tuple[float, float]]) -> dict[str, float]:
        start, end = points[0][1], points[-1][1]
        peak = max(v for _, v in points)
        slope, slope_se = slope_per_minute([(t, v) for t, v in points if t >= half])
        # Single samples wobble (±15 MiB seen); the means of the first and last tenth are steadier.
        tenth = max(1, len(points) // 10)
        first_mean = statistics.fmean(v for _, v in points[:tenth])
        last_mean = statistics.fmean(v for _, v in points[-tenth:])
        return {"start_mib": start, "end_mib": end, "max_mib": peak, "growth_mib": end - start,
                "growth_pct": (end - start) / start * 100, "slope_mib_per_min_second_half": slope,
                "slope_se_mib_per_min": slope_se, "slope_threshold_mib_per_min": 0.05 * start / 60,
                "first_tenth_mean_mib": first_mean, "last_tenth_mean_mib": last_mean,
                "mean_growth_pct": (last_mean - first_mean) / first_mean * 100}

    mem_total, mem_own = summary(totals), summary(owns)
    # Flat: under 5% growth over the soak, and the second half's trend is not clearly (2 standard errors)
    # above 5% of the starting RSS an hour. Plateau: it grew more than 5% early on, but the second half
    # no longer clearly trends up. Growing: the second half's slope is clearly above that rate.
    # RSS samples wobble by ~±15 MiB, so a 5-minute half resolves slopes only to about ±1-2 MiB/min.
    threshold = mem_total["slope_threshold_mib_per_min"]
    slope, slope_se = mem_total["slope_mib_per_min_second_half"], mem_total["slope_se_mib_per_min"]
    slope_ok = not slope - 2 * slope_se > threshold
    flat = mem_total["growth_pct"] < 5 and slope_ok
    verdict = "flat" if flat else "PLATEAU (grew over 5% early, no clear trend in the second half)" if slope_ok \
        else "GROWING"
    print(f"\nsoak: {total.sent} requests sent, {total.ok} ok, errors {fmt_errors(total.errors)}; "
          f"p50 {total.p(50):.1f} ms, p99 {total.p(99):.1f} ms; service CPU {cpu:.0f}% of one core; "
          f"{len(samples)} RSS samples")
    for kind, values in sorted(total.by_kind.items()):
        print(f"  {kind:>8}: {len(values):>6} ok, p50 {total.p(50, values):7.1f} ms, p99 {total.p(99, values):7.1f} ms")
    if total.server_ms:
        print(f"  single searches, server-side: total p50 {total.p(50, total.server_ms):.1f} / "
              f"p99 {total.p(99, total.server_ms):.1f} ms, encode (queue + batch) p50 "
              f"{total.p(50, total.encode_ms):.1f} / p99 {total.p(99, total.encode_ms):.1f} ms, "
              f"Milvus p50 {total.p(50, total.store_ms):.1f} / p99 {total.p(99, total.store_ms):.1f} ms")
    print(f"  {'upsert':>8}: {upsert_window.ok:>6} ok, p50 {upsert_window.p(50):7.1f} ms, "
          f"p99 {upsert_window.p(99):7.1f} ms, errors {fmt_errors(upsert_window.errors)} "
          f"(overwrites of {args.upsert_ids} ids)")
    print("\n| memory (RSS) | start MiB | end MiB | max MiB | growth MiB | growth % | first/last tenth mean MiB | "
          "growth of means % | slope 2nd half MiB/min |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mem in (("service + children", mem_total), ("service process", mem_own)):
        print(f"| {name} | {mem['start_mib']:.1f} | {mem['end_mib']:.1f} | {mem['max_mib']:.1f} | "
              f"{mem['growth_mib']:+.1f} | {mem['growth_pct']:+.2f} | {mem['first_tenth_mean_mib']:.1f} / "
              f"{mem['last_tenth_mean_mib']:.1f} | {mem['mean_growth_pct']:+.2f} | "
              f"{mem['slope_mib_per_min_second_half']:+.3f} |")
    print(f"second-half slope {slope:+.2f} ± {2 * slope_se:.2f} MiB/min (2 standard errors); 5% of the start an hour "
          f"is {threshold:.2f} MiB/min" + (" — this soak is too short to resolve that" if 2 * slope_se > threshold
                                            else ""))
    print(f"verdict: {verdict} (flat = growth start->end < 5% and second-half slope not clearly above "
          "5% of start per hour)")
    return {"rate": rate, "sent": total.sent, "ok": total.ok, "errors": total.errors, "p50_ms": total.p(50),
            "p99_ms": total.p(99), "service_cpu_pct": cpu, "upserts_ok": upsert_window.ok,
            "upsert_errors": upsert_window.errors, "upsert_p99_ms": upsert_window.p(99),
            "memory_total": mem_total, "memory_service": mem_own, "flat": flat, "verdict": verdict,
            "samples": [(round(t, 1), o, c) for t, o, c in samples],
            "per_minute": [{"sent": w.sent, "ok": w.ok, "errors": w.errors, "p50_ms": w.p(50), "p99_ms": w.p(99)}
                           for w in windows]}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    rows: list[dict[str, Any]] = list(read_corpus(shipped_corpus()))
    mix = QueryMix(rows, seed=args.seed, filter_share=args.filter_share, batch_share=args.batch_share)
    result: dict[str, object] = {"args": vars(args)}
    with run_service(args, workdir) as service:
        async with grpc.aio.insecure_channel(service.address) as channel:
            ready_s = await wait_serving(service, channel, args.start_timeout)
            own, children = service.rss()
            print(f"service SERVING on {service.address} after {ready_s:.1f} s (pid {service.process.pid}, "
                  f"RSS {own / MIB:.0f} MiB + children {children / MIB:.0f} MiB)", flush=True)
            stub = search_pb2_grpc.SearchServiceStub(channel)
            documents = [to_document(row) for row in rows]
            started = time.perf_counter()
            for i in range(0, len(documents), 64):
                await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents[i : i + 64]), timeout=300)
            print(f"seeded {len(documents)} FAQ documents through UpsertDocuments in "
                  f"{time.perf_counter() - started:.1f} s")
            [warm] = await open_loop(lambda: mix.next_call(stub, args.timeout_s), rate=min(5.0, args.soak_rate or 5.0),
                                     seconds=args.warmup_seconds, drain_s=args.timeout_s + 5)
            print(f"warm-up: {warm.ok} ok, {warm.error_count} errors, p50 {warm.p(50):.1f} ms, p99 {warm.p(99):.1f} ms")
            best: float | None = None
            if not args.skip_rate_search:
                best, steps = await rate_search(args, mix, stub, service)
                result.update(best_rate=best, steps=steps)
            if args.soak_seconds > 0:
                rate = args.soak_rate or max(1.0, (best or float(args.rates.split(",")[0])) * args.soak_fraction)
                await asyncio.sleep(args.pause_seconds)
                result["soak"] = await soak(args, rate, mix, stub, service)
            if service.process.poll() is not None:
                print(f"WARNING: the service exited during the run ({service.process.returncode})")
    log_text = service.log_path.read_text(encoding="utf-8", errors="replace")
    bad = [line for line in log_text.splitlines()
           if any(word in line.lower() for word in ("error", "exception", "traceback"))]
    print(f"\nservice log: {len(log_text.splitlines())} lines, {len(bad)} mentioning error/exception/traceback"
          + (f"; first: {bad[0][:300]}" if bad else ""))
    print(f"service exit code after SIGTERM: {service.process.returncode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=STAND_IN_MODEL)
    parser.add_argument("--rates", default=DEFAULT_RATES, help="comma-separated requests/s, ascending")
    parser.add_argument("--step-seconds", type=float, default=None, help="default 20 (--quick: 5)")
    parser.add_argument("--p99-ms", type=float, default=200.0)
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each request")
    parser.add_argument("--pause-seconds", type=float, default=3.0, help="idle time between steps")
    parser.add_argument("--warmup-seconds", type=float, default=None, help="default 10 (--quick: 5)")
    parser.add_argument("--skip-rate-search", action="store_true")
    parser.add_argument("--soak-seconds", type=float, default=None, help="default 600 (--quick: 60); 0 skips")
    parser.add_argument("--soak-rate", type=float, default=None, help="default: --soak-fraction of the best rate")
    parser.add_argument("--soak-fraction", type=float, default=0.5)
    parser.add_argument("--soak-warmup", type=float, default=None, help="default 30 (--quick: 10)")
    parser.add_argument("--sample-seconds", type=float, default=None, help="default 10 (--quick: 5)")
    parser.add_argument("--upsert-rate", type=float, default=1.0, help="UpsertDocuments a second during the soak")
    parser.add_argument("--upsert-ids", type=int, default=20, help="the fixed ids upserts overwrite")
    parser.add_argument("--filter-share", type=float, default=0.15)
    parser.add_argument("--batch-share", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--server-threads", type=int, default=0, help="SEMSEARCH_TORCH_THREADS (default: unset)")
    parser.add_argument("--server-log-level", default="WARNING")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 s steps, 60 s soak, 10 s soak warm-up")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    defaults = {"step_seconds": (20.0, 5.0), "warmup_seconds": (10.0, 5.0), "soak_seconds": (600.0, 60.0),
                "soak_warmup": (30.0, 10.0), "sample_seconds": (10.0, 5.0)}
    for name, (full, quick) in defaults.items():  # --quick changes only what was not given
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    print(f"bench_load · {platform.node()} · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()} · "
          f"Python {platform.python_version()} · load average {load_average()} · "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    with tempfile.TemporaryDirectory(prefix="semsearch-load-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(f"load average at end: {load_average()}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
