"""How many sends a second one fake Mailgun process sustains, and how true its latency stays.

The fake runs in a child process pinned to one core; this process, pinned to another,
keeps ``--concurrency`` realistic urlencoded sends in flight over keep-alive connections
(a closed loop: each connection sends again as soon as its answer arrives) for
``--duration`` seconds after a warm-up. It reports the achieved rate, the requests in
flight, the client-observed p50/p99 (HdrHistogram, µs) beside the model's theoretical
ones, errors, and the CPU both processes used. By Little's law the rate is concurrency /
mean latency: 1500 in flight at uniform:0.5,1.0 (mean 0.75 s) make at most 2,000 sends a
second, and exactly that only if the fake adds nothing to the latency.

The fake's own view comes beside the client's: how long it held each send (its ledger's
``accepted_at - received_at``) against the model, which tells the fake's lateness apart
from the client's and the network's. ``others_cpu_percent`` is what the rest of the
machine used meanwhile; on a shared machine the figures are only as good as it is small,
and ``--realtime`` (SCHED_FIFO, root) shields the two processes from that work.

Two load generators: ``--client raw`` (default), a minimal HTTP/1.1 client on asyncio
protocols, and ``--client aiohttp``. On a slow core the aiohttp client spends several
times the fake's CPU per request, so it saturates first and then measures itself.

    python benchmarks/fakegun_throughput.py [--latency uniform:0.5,1.0]
        [--concurrency 1500] [--duration 20] [--warmup 5] [--client raw|aiohttp]
        [--nice -10] [--realtime] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers.fakegun.admin import FakegunAdmin  # noqa: E402
from servers.fakegun.latency import LatencyModel, parse_latency  # noqa: E402
from servers.metrics import Summary, new_histogram, record_us  # noqa: E402

API_KEY = "key-mailbench"
DOMAIN = "mg.mailbench.test"
AUTHORIZATION = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
TEXT = "Hello,\n\nthis message was sent from the mailbench contact form. " * 6
_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


_BODY = urlencode(
    {
        "from": "mailbench <bench@mailbench.test>",
        "to": "reader@example.test",
        "subject": "Contact form message",
        "text": TEXT,
        "o:tag": "mailbench",
        "h:X-Mailbench-Run": "throughput",
        "v:idempotency_key": "bench-SEQUENCE",
    }
).encode()
_TEMPLATE = _BODY.replace(b"%", b"%%").replace(b"SEQUENCE", b"%d")


def send_body(sequence: int) -> bytes:
    """A send like the reference server's, with a unique idempotency key.

    Formatted from a template: the load generator must stay cheap beside the fake.
    """
    return _TEMPLATE % sequence


@dataclass
class Window:
    """What the load generators record: only answers that arrive inside [start, end)."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)  # seconds, into HDR afterwards
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    in_flight: int = 0

    def record(self, began: float, ended: float, outcome: str | None) -> None:
        if self.start <= ended < self.end:
            if outcome is None:
                self.latencies.append(ended - began)
            else:
                self.errors[outcome] += 1

    def histogram(self) -> Any:
        histogram = new_histogram()
        for seconds in self.latencies:
            record_us(histogram, seconds * 1e6)
        return histogram


async def drive_aiohttp(url: str, window: Window, concurrency: int, mean: float) -> None:
    loop = asyncio.get_running_loop()
    headers = {"Authorization": AUTHORIZATION, "Content-Type": "application/x-www-form-urlencoded"}
    target = f"{url}/v3/{DOMAIN}/messages"
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        # Spread the first sends over one mean latency so answers do not come in waves.
        await asyncio.sleep(index / concurrency * mean)
        while loop.time() < window.end:
            window.sent += 1
            body = send_body(window.sent)
            window.in_flight += 1
            began = loop.time()
            outcome: str | None
            try:
                async with session.post(target, data=body, headers=headers) as response:
                    await response.read()
                    outcome = None if response.status == 200 else str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            finally:
                window.in_flight -= 1
            window.record(began, loop.time(), outcome)

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        tasks = [asyncio.create_task(worker(i, session)) for i in range(concurrency)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=window.end - loop.time() + 40)


class _RawConnection(asyncio.Protocol):
    """One keep-alive connection sending a request as soon as the previous answer ends."""

    def __init__(self, window: Window, head: bytes, done: asyncio.Future[None]) -> None:
        self.window, self.head, self.done = window, head, done
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.began = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.loop.time() >= self.window.end:
            self.transport.close()
            return
        self.window.sent += 1
        body = send_body(self.window.sent)
        self.window.in_flight += 1
        self.began = self.loop.time()
        self.transport.write(self.head % len(body) + body)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end_of_head = self.buffer.find(b"\r\n\r\n")
        if end_of_head < 0:
            return
        match = _CONTENT_LENGTH.search(self.buffer, 0, end_of_head)
        end = end_of_head + 4 + (int(match.group(1)) if match else 0)
        if len(self.buffer) < end:
            return
        status = self.buffer[9:12].decode()
        self.buffer = self.buffer[end:]
        self.window.in_flight -= 1
        self.window.record(self.began, self.loop.time(), None if status == "200" else status)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.loop.time() < self.window.end:
            self.window.in_flight -= 1
            self.window.record(self.began, self.loop.time(), "connection lost")
        if not self.done.done():
            self.done.set_result(None)


async def drive_raw(url: str, window: Window, concurrency: int, mean: float) -> None:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    head = (
        f"POST /v3/{DOMAIN}/messages HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: {AUTHORIZATION}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
    ).encode()
    waits: list[asyncio.Future[None]] = []
    first = loop.time()
    for index in range(concurrency):
        # Spread the first sends over one mean latency so answers do not come in waves.
        await asyncio.sleep(max(0.0, first + index / concurrency * mean - loop.time()))
        done: asyncio.Future[None] = loop.create_future()
        waits.append(done)
        await loop.create_connection(
            lambda done=done: _RawConnection(window, head, done),  # type: ignore[misc]
            parts.hostname or "127.0.0.1",
            parts.port or 80,
        )
    await asyncio.wait(waits, timeout=window.end - loop.time() + 40)


def quantile(values: list[float], p: float) -> float:
    """Nearest rank, as HdrHistogram reads percentiles (but without its bucketing)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def held_latencies(url: str, start: float, end: float) -> list[float]:
    """How long the fake itself held each send of the window (its ledger's timestamps).

    Beside the client-observed latency this tells the fake's own lateness apart from
    the client's and the network's.
    """
    entries = await asyncio.to_thread(FakegunAdmin(url).ledger)
    return [e["accepted_at"] - e["received_at"] for e in entries if start <= e["accepted_at"] < end]


@dataclass
class Report:
    latency: str
    client: str
    concurrency: int
    duration_s: float
    requests: int
    errors: dict[str, int]
    rate_per_s: float
    in_flight_mean: float
    p50_us: int
    p99_us: int
    max_us: int
    model_p50_us: int
    model_p99_us: int
    p50_diff_ms: float
    p99_diff_ms: float
    fake_held_p50_diff_ms: float
    fake_held_p99_diff_ms: float
    fake_cpu_percent: float
    client_cpu_percent: float
    others_cpu_percent: float
    fake_event_loop: str
    nice: int
    realtime: bool
    fake_cpus: list[int]
    client_cpus: list[int]


async def measure(url: str, args: argparse.Namespace, fake: psutil.Process) -> Report:
    model: LatencyModel = parse_latency(args.latency, None)
    loop = asyncio.get_running_loop()
    window = Window(start=loop.time() + args.warmup, end=loop.time() + args.warmup + args.duration)
    drive = drive_raw if args.client == "raw" else drive_aiohttp
    load = asyncio.create_task(drive(url, window, args.concurrency, model.mean()))
    await asyncio.sleep(window.start - loop.time())
    me = psutil.Process()
    fake_before, client_before = fake.cpu_times(), me.cpu_times()
    machine_before = psutil.cpu_times()
    samples = []
    while loop.time() < window.end:
        samples.append(window.in_flight)
        await asyncio.sleep(min(0.1, max(0.0, window.end - loop.time())))
    fake_after, client_after = fake.cpu_times(), me.cpu_times()
    machine_after = psutil.cpu_times()
    wall_end = time.time()
    await load
    held = await held_latencies(url, wall_end - args.duration, wall_end)

    def cpu(before: Any, after: Any) -> float:
        used = float(after.user - before.user + after.system - before.system)
        return round(100 * used / float(args.duration), 1)

    def busy(times: Any) -> float:
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    # Whatever else ran on the machine meanwhile: on a shared machine, the figures
    # are only worth as much as this is small.
    others = busy(machine_after) - busy(machine_before)
    others -= (
        (cpu(fake_before, fake_after) + cpu(client_before, client_after)) * args.duration / 100
    )
    summary = Summary.of(window.histogram())
    model_p50, model_p99 = model.percentile(50) * 1e6, model.percentile(99) * 1e6
    return Report(
        latency=model.describe(),
        client=args.client,
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=len(window.latencies),
        errors=dict(window.errors),
        rate_per_s=round(len(window.latencies) / args.duration, 1),
        in_flight_mean=round(sum(samples) / max(1, len(samples)), 1),
        p50_us=summary.p50_us,
        p99_us=summary.p99_us,
        max_us=summary.max_us,
        model_p50_us=round(model_p50),
        model_p99_us=round(model_p99),
        p50_diff_ms=round((summary.p50_us - model_p50) / 1000, 2),
        p99_diff_ms=round((summary.p99_us - model_p99) / 1000, 2),
        fake_held_p50_diff_ms=round((quantile(held, 50) * 1e6 - model_p50) / 1000, 2),
        fake_held_p99_diff_ms=round((quantile(held, 99) * 1e6 - model_p99) / 1000, 2),
        fake_cpu_percent=cpu(fake_before, fake_after),
        client_cpu_percent=cpu(client_before, client_after),
        others_cpu_percent=round(100 * max(0.0, others) / args.duration, 1),
        fake_event_loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        nice=args.nice,
        realtime=args.realtime,
        fake_cpus=sorted(fake.cpu_affinity()),
        client_cpus=sorted(os.sched_getaffinity(0)),
    )


def start_fake(args: argparse.Namespace, cpus: set[int]) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "servers.fakegun.cli", "--port", "0", "--domain", DOMAIN]
    command += ["--latency", args.latency, "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # fakegun listening on http://HOST:PORT (latency SPEC)
    if "listening on" not in line:
        stop_fake(proc)
        raise SystemExit(f"the fake Mailgun did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split()[0]


def client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the cheaper the client's loop, the less of its own lag it
    adds to the latencies it measures."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def raise_priority(pid: int, nice: int) -> bool:
    """Set the niceness of a process and of its session's autogroup; False if refused.

    With autogrouping (the Linux default) the scheduler first shares a core between
    sessions, so a process's own niceness only counts against its session's others.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except PermissionError:
        return False
    autogroup = Path(f"/proc/{pid}/autogroup")
    with contextlib.suppress(OSError):
        if autogroup.exists():
            autogroup.write_text(str(nice))
    return True


def stop_fake(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--latency", default="uniform:0.5,1.0")
    parser.add_argument("--concurrency", type=int, default=1500)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not measured")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling niceness for the fake and this client (default -10, if permitted)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run the fake and this client under SCHED_FIFO (root; isolates them from "
        "other work on a shared machine, the kernel still leaves others 5%% of each core)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be in (0, 600] and --warmup in [0, 60]")
    if not 0 < args.concurrency <= 10_000:
        parser.error("--concurrency must be in (0, 10000]")

    cpus = sorted(os.sched_getaffinity(0))
    # One core each, so the fake's figures are those of one core and the client does
    # not steal its time; with a single core both share it (the report shows the CPUs).
    fake_cpus, client_cpus = ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else (set(), set())
    proc, url = start_fake(args, fake_cpus)
    try:
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        # Pinning keeps the two apart; a lower niceness keeps whatever else runs on the
        # machine from delaying them, which would read as latency the fake added.
        if not all(raise_priority(pid, args.nice) for pid in (proc.pid, os.getpid())):
            args.nice = os.getpriority(os.PRIO_PROCESS, 0)
        if args.realtime:
            for pid in (proc.pid, os.getpid()):
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
        with asyncio.Runner(loop_factory=client_loop_factory()) as runner:
            report = runner.run(measure(url, args, psutil.Process(proc.pid)))
    finally:
        stop_fake(proc)

    figures = asdict(report)
    for key, value in figures.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
