"""The ``mailbench`` command line: one entry point, one subcommand per tool.

Each subcommand's module is imported only when it runs, so ``mailbench fakegun`` never
pays for pandas and ``mailbench serve`` never imports matplotlib.

The signal policy is set here, once: for a command that owns children, SIGTERM raises
``KeyboardInterrupt`` as Ctrl-C does, so either stops every child and broker it started,
keeps what finished, and exits with 130. The servers (``serve``, ``worker``, ``fakegun``)
handle SIGTERM themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence

from harness.errors import MailbenchError

# subcommand -> (module, help); each module has add_cli_arguments(parser) and cli_main(args)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("harness.run.cli", "run the benchmark matrix and write a results folder"),
    "report": ("harness.report.build", "rebuild charts and report.md from results folders"),
    "compare": (
        "harness.gate.compare",
        "CI gate: compare a run against a baseline, exit 1 on regression",
    ),
    "bench-ci": (
        "harness.gate.bench_ci",
        "CI gate: measure baseline and candidate side by side, then compare",
    ),
    "trend": (
        "harness.gate.trend",
        "change points in the figures of successive main commits (a slow drift)",
    ),
    "chaos": (
        "harness.run.chaos",
        "kill workers, restart brokers, break the API under load; prove nothing is lost",
    ),
    "fakegun": (
        "servers.fakegun.cli",
        "serve a fake Mailgun API with latency, faults and a ledger",
    ),
    "serve": ("servers.web.app", "serve the reference web application in one mode"),
    "worker": ("servers.worker", "consume a queue and send through the Mailgun API"),
    "naive-worker": (
        "servers.naive",
        "poll RabbitMQ with auto-ack and send without retries (the naive mode's workers)",
    ),
    "celery-worker": (
        "servers.frameworks.celery",
        "run Celery's own worker on the mailbench task (a framework mode's workers)",
    ),
    "rq-worker": (
        "servers.frameworks.rq",
        "run an RQ worker pool on the mailbench task (a framework mode's workers)",
    ),
    "dramatiq-worker": (
        "servers.frameworks.dramatiq",
        "run Dramatiq's own worker on the mailbench actor (a framework mode's workers)",
    ),
    "huey-worker": (
        "servers.frameworks.huey",
        "run huey's own consumer on the mailbench task (a framework mode's workers)",
    ),
    "procrastinate-worker": (
        "servers.frameworks.procrastinate",
        "run Procrastinate's worker on the mailbench task (a framework mode's workers)",
    ),
    "arq-worker": (
        "servers.frameworks.arq",
        "run arq's own worker on the mailbench task (a framework mode's workers)",
    ),
    "services": (
        "harness.services.manager",
        "start, stop or show local RabbitMQ / Redis / PostgreSQL",
    ),
    "calibrate": (
        "harness.run.calibrate",
        "measure the load generator's own error against known service times",
    ),
}
# Commands that start processes of their own and so must unwind on SIGTERM as on Ctrl-C.
OWNS_CHILDREN = frozenset({"run", "chaos", "services", "bench-ci", "calibrate"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the parser of the command asked for: importing every tool costs seconds.
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "aio_pika", "aiormq", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(args.module_name)
    policy: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if args.command in OWNS_CHILDREN:
        from harness.process import sigterm_interrupts

        policy = sigterm_interrupts()
    try:
        with policy:
            return int(module.cli_main(args))
    except MailbenchError as exc:
        print(f"mailbench {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mailbench {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        return _summary_parser()
    parser = argparse.ArgumentParser(prog="mailbench")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    module_name, help_text = COMMANDS[chosen]
    command = sub.add_parser(chosen, help=help_text, description=help_text)
    importlib.import_module(module_name).add_cli_arguments(command)
    command.set_defaults(module_name=module_name)
    return parser


def _summary_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailbench",
        description="Measure what sending email inside a web request costs, against queues.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


if __name__ == "__main__":
    sys.exit(main())
