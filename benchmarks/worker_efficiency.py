"""Worker efficiency per queue backend against Little's law.

With C API calls in flight and a mean API latency L, no worker can deliver more than
C / L emails per second (≈ 267/s for C = 200 at ``uniform:0.5,1.0``). This benchmark
fills each backend's queue, lets one ``mailbench worker`` drain it against the fake
Mailgun, and reports the sustained delivered/s over a steady window as a fraction of that
limit (target ≥ 90%).

    python benchmarks/worker_efficiency.py [--backends sqlite,redis,rabbitmq,postgres,sqs]
        [--concurrency 200] [--latency uniform:0.5,1.0] [--window 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness.process import Children, free_port, mailbench_command
from harness.services.manager import Services
from harness.services.settings import ServiceSettings
from queues import open_queue
from queues.base import Email, Job
from servers.fakegun.admin import FakegunAdmin
from servers.fakegun.latency import parse_latency

BACKENDS = ("sqlite", "redis", "rabbitmq", "postgres", "sqs")
WARMUP_S = 4.0


async def fill(url: str, jobs: int, concurrency: int = 64) -> float:
    queue = await open_queue(url)
    started = time.perf_counter()
    pending = iter(range(jobs))

    async def enqueuer() -> None:
        for n in pending:
            email = Email(to=f"reader{n}@example.com", subject=f"bench {n}", text="hello")
            await queue.enqueue(Job(id=uuid.uuid4().hex, email=email))

    await asyncio.gather(*(enqueuer() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await queue.close()
    return jobs / elapsed


def delivered(fake_url: str) -> tuple[float, int]:
    return time.monotonic(), int(FakegunAdmin(fake_url).stats()["accepted"])


def measure(
    backend: str, url: str, args: argparse.Namespace, children: Children, logs: Path
) -> dict[str, Any]:
    limit = args.concurrency / parse_latency(args.latency, None).mean()
    jobs = int(limit * (WARMUP_S + args.window) * 1.3) + args.concurrency
    fill_rate = asyncio.run(fill(url, jobs))
    port = free_port()
    fake = children.start(
        "fakegun",
        mailbench_command("fakegun", "--port", str(port), "--latency", args.latency, "--seed", "1"),
        logs / f"{backend}-fakegun.log",
    )
    fake_url = f"http://127.0.0.1:{port}"
    fake.wait_http(f"{fake_url}/_mailbench/stats")
    worker = children.start(
        f"worker ({backend})",
        mailbench_command(
            "worker",
            "--backend",
            url,
            "--concurrency",
            str(args.concurrency),
            "--mailgun-url",
            fake_url,
            "--metrics-out",
            str(logs / f"{backend}-worker.json"),
        ),
        logs / f"{backend}-worker.log",
    )
    time.sleep(WARMUP_S)
    worker.check_alive()
    t0, n0 = delivered(fake_url)
    time.sleep(args.window)
    t1, n1 = delivered(fake_url)
    worker.check_alive()
    children.stop(worker, timeout=30)
    children.stop(fake)
    rate = (n1 - n0) / (t1 - t0)
    return {
        "backend": backend,
        "concurrency": args.concurrency,
        "latency": args.latency,
        "littles_law_limit_per_s": round(limit, 1),
        "delivered_per_s": round(rate, 1),
        "efficiency": round(rate / limit, 3),
        "prefill_enqueue_per_s": round(fill_rate, 1),
        "jobs": jobs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency", default="uniform:0.5,1.0")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured after warm-up")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="mailbench-workers-") as tmp,
        Children() as children,
        Services(ServiceSettings(base_dir=Path(tmp) / "services")) as services,
    ):
        Path(tmp).chmod(0o711)  # PostgreSQL runs as its own user and must reach its data
        logs = Path(tmp) / "logs"
        for backend in args.backends.split(","):
            url = f"sqlite:///{tmp}/jobs.db" if backend == "sqlite" else services.start(backend)
            row = measure(backend, url, args, children, logs)
            rows.append(row)
            print(
                f"{backend:>9}: {row['delivered_per_s']:6.1f} delivered/s of a Little's-law limit "
                f"{row['littles_law_limit_per_s']:.1f}/s = {row['efficiency']:.1%} "
                f"(C={args.concurrency}, {args.latency})",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["efficiency"] >= 0.9 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
