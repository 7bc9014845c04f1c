"""The task-queue frameworks beside mailbench's own worker on the same broker.

Two figures per mode, each framework mode (``servers.modes.FRAMEWORKS``) and the
reference queue on its broker (``redis`` for Celery on Redis and RQ, ``rabbitmq`` for
Celery on RabbitMQ, and so on: the reference queued mode with the same service):

* **enqueue** — ``POST /send`` p50/p99/p99.9 at fixed open-model rates (``--rates``,
  default 100 and 500 sends/s), from ``mailbench run --scenario sender --rate R``: what
  the request pays for the framework's enqueue, timed by the load generator, with the
  API at ``--latency`` so the workers keep up;
* **worker** — delivered/s of ONE worker process at API latency ``fixed:0.01`` (as
  ``benchmarks/worker_efficiency.py`` measures mailbench's worker): the queue is filled
  through the mode's own sender (the framework's enqueue), then one process of the
  mode's own worker command drains it against the fake Mailgun, counted over a steady
  window after a warm-up.

    python benchmarks/frameworks.py [--modes frameworks] [--rates 100,500]
        [--duration 8] [--warmup 2] [--window 6] [--jobs 8000] [--json out.json]

Prints a Markdown table and writes the figures as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.errors import MailbenchError
from harness.process import Children, free_port, mailbench_command, venv_python
from harness.results.folder import load_run
from harness.services.manager import Services
from harness.services.settings import ServiceSettings
from queues.base import Email, Job
from queues.errors import QueueError
from servers.fakegun.admin import FakegunAdmin
from servers.mailgun import MailgunSettings
from servers.metrics import Recorder
from servers.modes import FRAMEWORKS, MODES, QUEUED, Mode, parse_modes
from servers.queue_url import QUEUE_URL_VAR
from servers.senders.base import SenderContext, open_sender

WORKER_LATENCY = "fixed:0.01"
WARMUP_S = 2.0
POLL_S = 0.25
PERCENTILES = (50, 99, 99.9)


def reference_of(mode: Mode) -> str:
    """The reference queued mode on the framework's broker (``redis`` for ``rq``)."""

    def broker(m: Mode) -> tuple[str | None, str | None]:  # a file queue: its scheme
        return m.service, m.queue_file and m.queue_file.split(":", 1)[0]

    for name in QUEUED:
        if broker(MODES[name]) == broker(mode):
            return name
    raise SystemExit(f"no reference queue shares {mode.name}'s broker")


def with_references(modes: tuple[str, ...]) -> list[str]:
    """The modes asked for, each framework followed by its reference (once)."""
    names: list[str] = []
    for name in modes:
        for each in (name, reference_of(MODES[name])) if name in FRAMEWORKS else (name,):
            if each not in names:
                names.append(each)
    return names


def service_args(tmp: Path, ports: list[str]) -> list[str]:
    args = ["--services-dir", str(tmp / "services")]
    for port in ports:
        args += ["--port", port]
    return args


def enqueue_figures(
    modes: list[str], rate: int, args: argparse.Namespace, tmp: Path
) -> dict[str, dict[str, Any]]:
    """``mailbench run`` of every mode at ``rate`` sends/s: the send percentiles."""
    out = tmp / f"rate-{rate}"
    argv = mailbench_command(
        "run", "--modes", ",".join(modes), "--scenario", "sender", "--rate", str(rate),
        "--duration", f"{args.duration:g}", "--warmup", f"{args.warmup:g}",
        "--latency", args.latency, "--concurrency", str(args.concurrency),
        "--out", str(out), *service_args(tmp, args.port),
    )  # fmt: skip
    print(f"enqueue at {rate}/s: {' '.join(argv[2:])}", flush=True)
    subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, timeout=args.timeout)
    run = load_run(out / "latest")
    figures: dict[str, dict[str, Any]] = {}
    for mode in modes:
        send = run.row(mode, "send")
        intended = run.row(mode, "send_intended")
        if send is None or not send.count:
            continue
        figures[mode] = {
            "sends": send.count,
            "errors": send.errors,
            **{f"p{p:g}_us": send.us_at(p) for p in PERCENTILES},
            **(
                {f"intended_p{p:g}_us": intended.us_at(p) for p in PERCENTILES}
                if intended is not None and intended.count
                else {}
            ),
        }
    return figures


async def fill(mode: Mode, url: str, queue_name: str, jobs: int) -> float:
    """Enqueue ``jobs`` through the mode's own sender (as its server would); per s."""
    context = SenderContext(
        mailgun=MailgunSettings(),
        recorder=Recorder(),
        queue_url=url,
        queue_name=queue_name,
        framework_config=mode.config,
    )
    sender = await open_sender(mode, context)
    pending = iter(range(jobs))
    refused = 0

    async def enqueuer() -> None:
        nonlocal refused
        for n in pending:
            email = Email(to=f"reader{n}@example.com", subject=f"bench {n}", text="hello")
            handed = await sender.hand(Job(id=uuid.uuid4().hex, email=email))
            refused += not handed.accepted

    started = time.perf_counter()
    try:
        await asyncio.gather(*(enqueuer() for _ in range(32)))
    finally:
        await sender.aclose()
    if refused:
        raise SystemExit(f"{mode.name}: the broker refused {refused} of {jobs} jobs")
    return jobs / (time.perf_counter() - started)


def fill_in_its_venv(mode: Mode, url: str, queue_name: str, jobs: int) -> float:
    """:func:`fill`, in this process, or in the mode's own venv where it has one (arq's
    sender needs arq, which the harness's venv does not have)."""
    if mode.python is None:
        return asyncio.run(fill(mode, url, queue_name, jobs))
    done = subprocess.run(
        [venv_python(mode.python), __file__, "--fill", mode.name, queue_name, str(jobs)],
        env={**os.environ, QUEUE_URL_VAR: url},  # the URL holds the broker's password
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode.name}: filling its queue failed: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def worker_figures(
    name: str, services: Services, args: argparse.Namespace, children: Children, tmp: Path
) -> dict[str, Any]:
    """One worker process of the mode draining a filled queue at ``fixed:0.01``."""
    mode = MODES[name]
    assert mode.worker is not None
    url = mode.queue_file.format(dir=tmp) if mode.queue_file else services.start(str(mode.service))
    queue_name = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    fill_rate = fill_in_its_venv(mode, url, queue_name, args.jobs)
    logs, port = tmp / "logs", free_port()
    fake = children.start(
        "fakegun",
        mailbench_command("fakegun", "--port", str(port), "--latency", WORKER_LATENCY),
        logs / f"{name}-fakegun.log",
    )
    fake_url = f"http://127.0.0.1:{port}"
    fake.wait_http(f"{fake_url}/_mailbench/stats")
    admin = FakegunAdmin(fake_url)
    worker = children.start(
        f"worker ({name})",
        mailbench_command(
            mode.worker,
            "--queue-name",
            queue_name,
            "--concurrency",
            str(args.concurrency),
            "--mailgun-url",
            fake_url,
            "--metrics-out",
            str(logs / f"{name}-worker.json"),
            *mode.worker_args,
            python=mode.python,
        ),
        logs / f"{name}-worker.log",
        env={QUEUE_URL_VAR: url},
    )

    def delivered() -> tuple[float, int]:
        return time.monotonic(), int(admin.stats()["accepted"])

    try:
        # The warm-up starts at the first delivery: worker start-up is not its speed.
        deadline = time.monotonic() + 60
        while delivered()[1] == 0 and time.monotonic() < deadline:
            worker.check_alive()
            time.sleep(POLL_S)
        time.sleep(WARMUP_S)
        t0, n0 = t1, n1 = delivered()
        # Until the window ends, or before the queue runs dry (the rate would drop).
        while t1 - t0 < args.window and n1 < 0.9 * args.jobs:
            time.sleep(POLL_S)
            worker.check_alive()
            t1, n1 = delivered()
    finally:
        children.stop(worker, timeout=30)
        children.stop(fake)
    if t1 - t0 < 1.0:
        raise SystemExit(f"{name}: the queue ran dry in the warm-up; raise --jobs")
    return {
        "delivered_per_s": round((n1 - n0) / (t1 - t0), 1),
        "window_s": round(t1 - t0, 1),
        "fill_per_s": round(fill_rate, 1),
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "latency": WORKER_LATENCY,
    }


def markdown(rows: list[dict[str, Any]], rates: list[int]) -> str:
    def ms(us: int | None) -> str:
        return "–" if us is None else f"{us / 1000:.2f} ms"

    header = ["mode", "reference"]
    for rate in rates:
        header += [f"enqueue p{p:g} @{rate}/s" for p in PERCENTILES]
    header += ["worker delivered/s @fixed:0.01"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        cells = [row["mode"], row["reference"] or "–"]
        for rate in rates:
            figures = row["enqueue"].get(str(rate)) or {}
            cells += [ms(figures.get(f"p{p:g}_us")) for p in PERCENTILES]
        worker = row.get("worker") or {}
        cells.append(f"{worker['delivered_per_s']:,.0f}" if worker else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--modes", default="frameworks", help="framework modes (default: all of them)")
    add("--rates", default="100,500", help="open-model sends/s for the enqueue figures")
    add("--duration", type=float, default=8.0, help="seconds of load per mode and rate")
    add("--warmup", type=float, default=2.0)
    add("--latency", default=WORKER_LATENCY, help="the API's latency in the enqueue runs")
    add("--concurrency", type=int, default=200, help="each worker's sends in flight")
    add("--window", type=float, default=6.0, help="seconds of the worker's steady drain")
    add("--jobs", type=int, default=8000, help="jobs queued before the worker starts")
    add("--port", action="append", default=[], metavar="SERVICE=PORT", help="broker ports")
    add("--timeout", type=float, default=1200.0, help="seconds per mailbench run at most")
    add("--skip", default="", help="'enqueue' or 'worker': leave that part out")
    add("--json", type=Path, help="also write the figures here")
    add("--keep", type=Path, help="keep runs and logs in this folder (default: a temporary one)")
    add("--fill", nargs=3, metavar=("MODE", "QUEUE", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fill:  # one queue filled in this interpreter: the rate on stdout
        filled = MODES[args.fill[0]]
        url, queue_name, jobs = os.environ[QUEUE_URL_VAR], args.fill[1], int(args.fill[2])
        print(asyncio.run(fill(filled, url, queue_name, jobs)))
        return 0
    modes = with_references(parse_modes(args.modes))
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    rows: list[dict[str, Any]] = [
        {"mode": m, "reference": reference_of(MODES[m]) if m in FRAMEWORKS else None,
         "enqueue": {}}
        for m in modes
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mailbench-frameworks-") as name:
        tmp = args.keep.resolve() if args.keep else Path(name)
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o711)  # PostgreSQL runs as its own user and must reach its data
        if "enqueue" not in args.skip:
            for rate in rates:
                for mode, figures in enqueue_figures(modes, rate, args, tmp).items():
                    rows[modes.index(mode)]["enqueue"][str(rate)] = figures
                keep(rows, args.json)
        if "worker" not in args.skip:
            ports: dict[str, Any] = {f"{k.replace('-', '_')}_port": int(v) for k, _, v in
                     (p.partition("=") for p in args.port)}  # fmt: skip
            settings = replace(ServiceSettings(base_dir=tmp / "worker-services"), **ports)
            with Children() as children, Services(settings) as services:
                for row in rows:
                    try:
                        row["worker"] = worker_figures(row["mode"], services, args, children, tmp)
                    except (SystemExit, MailbenchError, QueueError) as exc:
                        # One mode that cannot be measured costs its cell, not the run's.
                        row["worker_error"] = str(exc)
                        print(f"{row['mode']:>26}: not measured: {exc}", flush=True)
                        continue
                    finally:
                        keep(rows, args.json)
                    print(f"{row['mode']:>26}: {row['worker']['delivered_per_s']:,.0f} "
                          "delivered/s, one worker process", flush=True)  # fmt: skip
    print("\n" + markdown(rows, rates), flush=True)
    return 0 if not any("worker_error" in row for row in rows) else 1


def keep(rows: list[dict[str, Any]], path: Path | None) -> None:
    """The figures so far, written as each part ends: a later failure keeps them."""
    if path is not None:
        path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
