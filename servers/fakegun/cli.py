"""``mailbench fakegun`` and ``python -m servers.fakegun``: the fake Mailgun's options, its
event loop and garbage-collector tuning (see :mod:`servers.fakegun` for what it serves)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from queues.errors import MailbenchError
from servers.fakegun.faults import Fault, RateLimit, parse_fault, parse_rate_limit
from servers.fakegun.latency import DEFAULT_LATENCY
from servers.fakegun.ledger import LedgerEntry
from servers.fakegun.server import FakegunSettings, FakeMailgun
from servers.identity import identity_from

__all__ = [
    "FakeMailgun",
    "FakegunSettings",
    "Fault",
    "LedgerEntry",
    "RateLimit",
    "add_cli_arguments",
    "cli_main",
    "main",
    "parse_fault",
    "parse_rate_limit",
    "settings_from_args",
]

logger = logging.getLogger(__name__)


# -- command line -------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind")
    add("--port", type=int, default=8025, help="port to bind (0: any free port)")
    add(
        "--api-key",
        default=os.environ.get("MAILGUN_API_KEY", FakegunSettings.api_key),
        help="the API key clients must send (default: $MAILGUN_API_KEY; ps shows command lines)",
    )
    add("--domain", action="append", default=[], help="accepted domain, repeatable (default any)")
    add("--latency", default=DEFAULT_LATENCY, help=f"latency spec (default {DEFAULT_LATENCY})")
    add("--seed", type=int, default=None, help="seed for the latency and fault draws")
    add(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:PROB",
        help="inject STATUS:PROB (e.g. 503:0.01, 429:0.02), reset:PROB, hang:PROB or "
        "malformed:PROB (accepted, answer not JSON); repeatable, drawn from --seed",
    )
    add(
        "--rate-limit",
        metavar="RATE[:BURST]",
        help="token bucket: RATE sends a second, BURST (default RATE) at once; "
        "beyond it 429 with Retry-After",
    )
    add(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="once listening, write the port bound to PATH (with --port 0: which one it got)",
    )
    add(
        "--idempotency",
        action="store_true",
        help="a repeated Idempotency-Key gets the first answer and is not delivered again "
        "(off by default, as on the real Mailgun)",
    )


def settings_from_args(args: argparse.Namespace) -> FakegunSettings:
    return FakegunSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        domains=tuple(args.domain),
        latency=args.latency,
        seed=args.seed,
        faults=tuple(parse_fault(text) for text in args.fault),
        rate_limit=None if args.rate_limit is None else parse_rate_limit(args.rate_limit),
        idempotency=args.idempotency,
        identity=identity_from(os.environ),
    )


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` whole or not at all: a reader never sees half a number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{port}\n")
    os.replace(partial, path)


async def _serve(settings: FakegunSettings, port_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeMailgun(settings) as fake:
        print(f"fakegun listening on {fake.url} (latency {fake.model.describe()})", flush=True)
        if port_file is not None:
            write_port_file(port_file, fake.port)
        await stop.wait()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # uvloop, when installed, cuts the fake's CPU per request by a fifth and keeps the
    # achieved latency closer to the model at thousands of sends a second.
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop is not installed: the fake runs on the asyncio event loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _tune_garbage_collection() -> None:
    # At 1,500 sends in flight each holds ~100 container objects for its 0.5-1 s of
    # latency, so the default thresholds promote them all and scan them over and over:
    # measured, ~15% of the fake's CPU and pauses of 20-170 ms, which clients would see
    # as latency the model never drew. The fake makes next to no reference cycles and
    # keeps its ledger in untracked objects, so collect only once a million tracked
    # objects have piled up; freezing first leaves the imported modules out of it.
    gc.freeze()
    gc.set_threshold(1_000_000)


def cli_main(args: argparse.Namespace) -> int:
    """Run the fake until SIGINT or SIGTERM; raise ConfigError on bad options."""
    settings = settings_from_args(args)
    _tune_garbage_collection()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, args.port_file))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m servers.fakegun``: the same server without the mailbench front end."""
    parser = argparse.ArgumentParser(prog="python -m servers.fakegun")
    add_cli_arguments(parser)
    try:
        return cli_main(parser.parse_args(argv))
    except MailbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
