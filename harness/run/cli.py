"""The ``mailbench run`` command line: options → :class:`~harness.run.config.RunConfig` → a run.

Also home of what every load-driving command shares (``mailbench chaos`` too): the
options of the tiers and of the load, and the broker URL of each queued mode.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from harness.errors import ConfigError, MailbenchError, ServiceUnavailable
from harness.process import Children
from harness.report.build import build_report
from harness.results.folder import ModeResult, point_latest
from harness.run.config import (
    DEFAULT_LATENCY,
    DEFAULT_MODES,
    DEFAULT_WARMUP_S,
    PROFILES,
    SCENARIOS,
    RunConfig,
)
from harness.run.driver import Driver, Hooks
from harness.run.locust import on_loopback
from harness.run.target import DEFAULT_FAKEGUN_PORT, MAILGUN_URL_VAR, Target
from harness.services.manager import Services, add_service_arguments, settings_from_args
from harness.services.settings import ServiceSettings
from servers.fakegun.faults import check_faults, parse_fault, parse_rate_limit
from servers.modes import mode as mode_named
from servers.modes import parse_modes


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--users", type=int, help="concurrent Locust users (closed model)")
    load.add_argument(
        "--rate", type=float, help="visits started per second whatever the server does (open model)"
    )
    parser.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="open model: Poisson or evenly spaced starts (default: poisson)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=1000,
        help="open model: visits running at once at most (default: 1000)",
    )
    parser.add_argument("--duration", type=float, help="seconds of load per mode")
    parser.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP_S,
        metavar="S",
        help="first seconds of each mode's load left out of its figures; still shown, "
        f"marked, in the per-second timeline (default: {DEFAULT_WARMUP_S:g})",
    )
    parser.add_argument(
        "--latency",
        default=DEFAULT_LATENCY,
        help="fake Mailgun latency model, e.g. fixed:0.75, uniform:0.5,1.0, "
        "lognormal:median=0.7,sigma=0.4,max=5",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root folder")
    add_tier_arguments(parser)
    remote = parser.add_argument_group("load generators on other hosts (see docs/scaling.md)")
    remote.add_argument(
        "--expect-workers",
        type=int,
        default=0,
        metavar="N",
        help="the load comes from N Locust workers started on other hosts (locust -f "
        "scenarios/SCENARIO.py --worker --master-host HOST --master-port PORT), which join "
        "this run's Locust master; they quit with it, once per mode",
    )
    remote.add_argument(
        "--master-host",
        default="127.0.0.1",
        help="address the Locust master listens on for them (default: 127.0.0.1)",
    )
    remote.add_argument("--master-port", type=int, default=5557, help="its port (default: 5557)")
    add_service_arguments(parser, dir_flag="--services-dir", per_run=True)
    parser.add_argument(
        "--inject-send-delay-ms",
        type=float,
        default=0.0,
        help="add a known delay to POST /send (to test the CI gate)",
    )
    for page, where in (("send", "POST /send"), ("form", "the form page")):
        parser.add_argument(
            f"--inject-{page}-work-us",
            type=float,
            default=0.0,
            metavar="US",
            help=f"spend US µs computing in every {where}, the event loop held (to test "
            "the CI gate with a slowdown finer than a sleep)",
        )
    add_fault_arguments(parser, faults="", rate_limit="")
    add_target_arguments(parser)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """An external server and, if the harness is to start them, its processes' commands."""
    target = parser.add_argument_group("an external server (see docs/target.md for the contract)")
    target.add_argument("--target", metavar="URL", help="drive this server instead of ours")
    target.add_argument("--target-name", default="target", help="its name in the results")
    target.add_argument(
        "--target-label",
        metavar="TEXT",
        help="what the stack is, named in the reports, charts and comparisons, e.g. "
        "'Django + Celery 5.4 on Redis, gunicorn 4 workers' (default: the URL's host:port)",
    )
    target.add_argument("--form-path", default="/", help="path of the form page (default: /)")
    target.add_argument("--send-path", default="/send", help="path the form posts to")
    target.add_argument(
        "--fields",
        default="to,subject,message",
        metavar="TO,SUBJECT,MESSAGE",
        help="names of the recipient, subject and message fields (default: to,subject,message)",
    )
    target.add_argument(
        "--fakegun-port",
        type=int,
        help=f"start the fake Mailgun the target sends to on this port (default: "
        f"{DEFAULT_FAKEGUN_PORT}, or any free port with --server-cmd/--worker-cmd, which are "
        f"told it in ${MAILGUN_URL_VAR}; 0: any free port, printed and kept in the manifest)",
    )
    target.add_argument("--fakegun-url", help="use this running fake Mailgun instead")
    for tier in ("server", "worker"):
        target.add_argument(
            f"--{tier}-cmd",
            metavar="CMD",
            help=f"start the target's {tier} processes with this command (split as a shell "
            f"would, $VARIABLES of docs/target.md filled in, no shell run), --{tier}-procs of "
            "them, and stop them at the end",
        )


def add_fault_arguments(parser: argparse.ArgumentParser, faults: str, rate_limit: str) -> None:
    """What the fake Mailgun the harness starts does wrong, for every mode or target."""
    shown = {"": "none"}
    parser.add_argument(
        "--api-faults",
        default=faults,
        metavar="SPEC",
        help="faults of the fake Mailgun, KIND:PROB,... with KIND a status, reset, hang or "
        f"malformed (default: {shown.get(faults, faults)}; '' for none)",
    )
    parser.add_argument(
        "--rate-limit",
        default=rate_limit,
        metavar="RATE[:BURST]",
        help=f"the fake's token bucket, sends/s (default: {shown.get(rate_limit, rate_limit)}"
        "; '' for none)",
    )
    parser.add_argument(
        "--idempotency",
        action="store_true",
        help="the fake honours Idempotency-Key: a retry is not delivered twice",
    )


def fake_options(args: argparse.Namespace) -> tuple[str, ...]:
    """``mailbench fakegun``'s options for ``--api-faults``, ``--rate-limit`` and
    ``--idempotency``; a bad spec fails here, not in the fake's log."""
    options: list[str] = []
    faults = [f.strip() for f in args.api_faults.split(",") if f.strip()]
    check_faults([parse_fault(text) for text in faults])
    for text in faults:
        options += ["--fault", text]
    if args.rate_limit:
        parse_rate_limit(args.rate_limit)
        options += ["--rate-limit", args.rate_limit]
    if args.idempotency:
        options.append("--idempotency")
    if options and getattr(args, "fakegun_url", None):
        raise ConfigError(
            "--api-faults, --rate-limit and --idempotency shape the fake Mailgun mailbench "
            "starts; the one at --fakegun-url keeps its own: start it with those options "
            "(mailbench fakegun --fault ... --rate-limit ...), or drop --fakegun-url."
        )
    return tuple(options)


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """Processes per tier, and the CPU work per email."""
    parser.add_argument(
        "--locust-procs",
        "--locust-processes",
        dest="locust_processes",
        type=int,
        default=0,
        help="Locust processes (its --processes N; histograms are merged on its master)",
    )
    parser.add_argument(
        "--server-procs", type=int, default=1, help="server processes sharing the port"
    )
    parser.add_argument(
        "--worker-procs", type=int, default=1, help="worker processes per queued mode"
    )
    parser.add_argument(
        "--concurrency", type=int, help="API calls in flight per worker process (queued modes)"
    )
    parser.add_argument(
        "--cpus",
        action="append",
        default=[],
        metavar="TIER=CPU[,CPU...]",
        help=f"run a tier ({', '.join(TIERS)}) on these CPUs only, as if it had a machine of "
        "its own; repeatable, e.g. --cpus server=0 --cpus worker=1",
    )
    parser.add_argument(
        "--nice",
        action="append",
        default=[],
        metavar="TIER=N",
        help="run a tier at a lower CPU priority (0-19), so that it takes only the CPU time "
        "the others leave, e.g. --nice worker=10 to keep workers' CPU work from the server",
    )
    parser.add_argument(
        "--render-ms",
        type=float,
        default=0.0,
        help="render a personalised image per email costing about MS of CPU: inside the "
        "request in direct/blocking mode, in the worker otherwise (default: 0, off)",
    )


TIERS = ("fakegun", "server", "worker", "locust")


def parse_cpus(specs: list[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``TIER=CPU[,CPU...]`` options, checked against the CPUs this process may use."""
    available = os.sched_getaffinity(0)
    pinned: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        tier, _, listed = spec.partition("=")
        try:
            cpus = tuple(sorted({int(c) for c in listed.split(",") if c.strip()}))
        except ValueError:
            cpus = ()
        if tier not in TIERS or not cpus:
            raise ConfigError(
                f"--cpus {spec!r}: use TIER=CPU[,CPU...] with TIER one of {', '.join(TIERS)}, "
                "e.g. --cpus server=0 --cpus worker=1"
            )
        if missing := set(cpus) - available:
            raise ConfigError(
                f"--cpus {spec!r}: CPU {sorted(missing)} is not available here "
                f"(available: {sorted(available)})"
            )
        pinned[tier] = cpus
    return tuple(pinned.items())


def parse_nice(specs: list[str]) -> tuple[tuple[str, int], ...]:
    """``TIER=N`` options: the tier's CPU priority, 0 (normal) to 19 (only spare time)."""
    values: dict[str, int] = {}
    for spec in specs:
        tier, _, text = spec.partition("=")
        if tier not in TIERS or not text.strip().isdigit() or not 0 <= int(text) <= 19:
            raise ConfigError(
                f"--nice {spec!r}: use TIER=N with TIER one of {', '.join(TIERS)} and N from "
                "0 to 19, e.g. --nice worker=10"
            )
        values[tier] = int(text)
    return tuple(values.items())


def check_tiers(args: argparse.Namespace) -> None:
    for option in ("server_procs", "worker_procs"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be at least 1")
    if args.locust_processes < 0 or args.render_ms < 0:
        raise ConfigError("--locust-procs and --render-ms cannot be negative")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")


def target_from_args(args: argparse.Namespace) -> Target | None:
    commands = {tier: getattr(args, f"{tier}_cmd", None) for tier in ("server", "worker")}
    if not args.target:
        if given := [f"--{tier}-cmd" for tier, cmd in commands.items() if cmd is not None]:
            raise ConfigError(
                f"{' and '.join(given)} start a target's processes: give its URL with "
                "--target URL too."
            )
        return None
    fields = [f.strip() for f in args.fields.split(",")]
    if len(fields) != 3 or not all(fields):
        raise ConfigError(f"--fields {args.fields!r}: give three names, e.g. to,subject,message")
    server_cmd, worker_cmd = (split_command(f"--{t}-cmd", c) for t, c in commands.items())
    fakegun_port = args.fakegun_port
    if fakegun_port is None:  # commands the harness starts are told any port
        fakegun_port = 0 if server_cmd or worker_cmd else DEFAULT_FAKEGUN_PORT
    return Target(
        url=args.target,
        name=args.target_name,
        form_path=args.form_path,
        send_path=args.send_path,
        field_to=fields[0],
        field_subject=fields[1],
        field_message=fields[2],
        fakegun_port=fakegun_port,
        fakegun_url=args.fakegun_url,
        server_cmd=server_cmd,
        worker_cmd=worker_cmd,
        label=args.target_label.strip() if args.target_label is not None else None,
    )


def split_command(option: str, command: str | None) -> tuple[str, ...]:
    """A ``--server-cmd``/``--worker-cmd`` as argv, split as a shell would."""
    if command is None:
        return ()
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise ConfigError(f"{option} {command!r} does not split into words ({exc}): "
                          "check its quotes.") from exc  # fmt: skip
    if not argv:
        raise ConfigError(f"{option} is empty: give the command that starts the process.")
    return argv


def config_from_args(args: argparse.Namespace) -> RunConfig:
    profile = PROFILES[args.profile]
    check_tiers(args)
    target = target_from_args(args)
    modes = (target.name,) if target is not None else parse_modes(args.modes)
    users = args.users if args.users is not None else profile.users
    duration = args.duration if args.duration is not None else profile.duration_s
    if args.expect_workers < 0 or (args.expect_workers and args.locust_processes):
        raise ConfigError(
            "--expect-workers N takes N ≥ 0 workers from other hosts, instead of "
            "--locust-procs: give one or the other"
        )
    if args.expect_workers and (target is None or on_loopback(target.url)):
        raise ConfigError(
            "--expect-workers needs --target URL at an address the other hosts reach "
            "(mailbench's own servers listen on 127.0.0.1), e.g. --target http://10.0.0.5:8080"
        )
    if not 0 <= args.warmup < duration:
        raise ConfigError(
            f"--warmup {args.warmup:g} must be at least 0 and shorter than the load "
            f"({duration:g} s), e.g. --warmup 3 --duration 20"
        )
    return RunConfig(
        modes=modes,
        profile=profile.name,
        scenario=args.scenario,
        users=users,
        rate=args.rate,
        arrivals=args.arrivals,
        max_in_flight=args.max_in_flight,
        sweep=profile.name == "full",
        spawn_rate=min(profile.spawn_rate, users),
        duration_s=duration,
        warmup_s=args.warmup,
        latency=args.latency,
        seed=args.seed,
        out=args.out,
        locust_processes=args.locust_processes,
        expect_workers=args.expect_workers,
        master_host=args.master_host,
        master_port=args.master_port,
        server_procs=args.server_procs,
        worker_procs=args.worker_procs,
        worker_concurrency=args.concurrency or profile.worker_concurrency,
        render_ms=args.render_ms,
        cpus=parse_cpus(args.cpus),
        nice=parse_nice(args.nice),
        drain_timeout_s=profile.drain_timeout_s,
        send_delay_ms=args.inject_send_delay_ms,
        send_work_us=args.inject_send_work_us,
        form_work_us=args.inject_form_work_us,
        fake_options=fake_options(args),
        target=target,
    )


class QueueUrls:
    """The queue URL of each queued mode: a file in the run's folder (SQLite) needs
    nothing; the others need their broker, started on first use (or taken from AMQP_URL /
    REDIS_URL / DATABASE_URL)."""

    def __init__(self, services: Services, run_dir: Path, strict: bool) -> None:
        self.services = services
        self.run_dir = run_dir
        self.strict = strict  # under CI a missing broker fails the run instead of skipping

    def __call__(self, name: str) -> str | None:
        mode = mode_named(name)
        if mode.queue_file is not None:
            folder = (self.run_dir / "queue").resolve()
            folder.mkdir(parents=True, exist_ok=True)
            return mode.queue_file.format(dir=folder)
        assert mode.service is not None
        try:
            return self.services.start(mode.service)
        except ServiceUnavailable as exc:
            if self.strict:
                raise
            print(f"skipping mode {name}: {exc}", file=sys.stderr, flush=True)
            return None


def strict_brokers() -> bool:
    """Under CI a missing broker fails the run instead of skipping its mode."""
    return os.environ.get("CI", "").lower() == "true"


def warn_unsound(results: list[ModeResult]) -> None:
    for result in results:
        counts = result.accounting
        if not counts.sound:
            failures = f"; {counts.failures}" if counts.failures else ""
            print(
                f"WARNING: {result.mode}: accounting {counts.verdict}, lost={counts.lost} "
                f"unexpected={counts.unexpected}{failures}",
                file=sys.stderr,
            )


def cli_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    where = f"target {config.target.url}" if config.target else f"modes {', '.join(config.modes)}"
    print(
        f"mailbench run {config.run_id}: {where}; "
        f"{config.load_model}, {config.duration_s:.0f} s each; API latency {config.latency}",
        flush=True,
    )
    results = drive(config, settings_from_args(args))
    print(f"results in {config.run_dir}/ (report.md, charts/gap.png)", flush=True)
    warn_unsound(results)
    return 0


MakeHooks = Callable[[Services], Hooks]


def drive(
    config: RunConfig, services: ServiceSettings, make_hooks: MakeHooks | None = None
) -> list[ModeResult]:
    """Run the modes with their children and brokers (and the hooks ``make_hooks`` gives,
    e.g. chaos), then report the run; after Ctrl-C or SIGTERM, report the modes that
    finished and raise again."""
    driver: Driver | None = None
    try:
        with Children() as children, Services(services) as brokers:
            queue_urls = QueueUrls(brokers, config.run_dir, strict_brokers())
            hooks = make_hooks(brokers) if make_hooks is not None else None
            driver = Driver(config, children, queue_urls, hooks, services=services)
            results = driver.run()
    except KeyboardInterrupt:
        # Every child is stopped by now; what finished is kept and reported.
        keep_partial_results(config.run_dir, driver.results if driver else [])
        raise
    if not results:
        raise MailbenchError("no mode could run; see the messages above")
    build_report(config.run_dir)
    point_latest(config.run_dir)
    return results


def keep_partial_results(run_dir: Path, results: list[ModeResult]) -> None:
    """After Ctrl-C or SIGTERM: a report of the modes that finished, if any did."""
    if not results:
        print(f"interrupted before any mode finished; logs in {run_dir}/logs", file=sys.stderr)
        return
    build_report(run_dir)
    point_latest(run_dir)
    modes = ", ".join(r.mode for r in results)
    print(f"interrupted: the finished modes ({modes}) are in {run_dir}/", file=sys.stderr)
