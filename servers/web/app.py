"""The reference web application: one form, one POST handler, a sender per mode.

Every mode serves the identical form page; only how ``POST /send`` lets the email leave
differs: the mode's sender (declared in :mod:`servers.modes`, implemented in
:mod:`servers.senders`). A 2xx from ``POST /send`` is a promise that the email will be
delivered: in ``direct``/``blocking`` mode the API has accepted it, in a queued mode the
broker has durably accepted the job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from queues.base import Email, Job
from queues.errors import MailbenchError
from servers.identity import identity_from
from servers.mailgun import MailgunSettings, add_mailgun_arguments, mailgun_settings_from_args
from servers.modes import MODES, mode
from servers.phases import PhasedRecorder, PhaseFile, add_phase_argument, write_phases
from servers.queue_url import QUEUE_URL_VAR, queue_url_from
from servers.senders.base import Sender, SenderContext, open_sender
from servers.web.csrf import FIELD as CSRF_FIELD
from servers.web.csrf import Csrf, CsrfError
from servers.web.formdata import MAX_FIELDS, BodyError, Form, read_form
from servers.web.forms import (
    MAX_BODY_BYTES,
    FormError,
    empty_form,
    render_done,
    render_form,
    validate,
)

log = logging.getLogger(__name__)

# Pages that carry a form with a token (and maybe the visitor's values) are not to be
# framed by another site, which could otherwise trick a click on its Send button.
_HTML_HEADERS = {"X-Frame-Options": "DENY"}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    mode: str = "direct"
    host: str = "127.0.0.1"
    port: int = 8080
    mailgun: MailgunSettings = field(default_factory=MailgunSettings)
    queue_url: str | None = field(default=None, repr=False)  # queued modes; may hold a password
    queue_name: str = "mailbench"
    metrics_out: Path | None = None  # histograms and the accepted count, written at shutdown
    phase_file: Path | None = None  # the harness's phases of the run (servers.phases)
    send_delay_ms: float = 0.0  # fault knob: a known extra delay on the send path
    # Fault knobs: CPU time spent in a handler (the event loop blocked, as slower code does).
    send_work_us: float = 0.0
    form_work_us: float = 0.0
    csrf_secret: str | None = field(default=None, repr=False)  # None: $MAILBENCH_SECRET
    render_ms: float = 0.0  # CPU work per email, a card rendered in the request (0: none)
    # The harness's token for this process (servers.identity), answered in its metrics.
    identity: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if mode(self.mode).queued and not self.queue_url:
            raise MailbenchError(f"mode {self.mode!r} needs a queue URL (--queue-url)")


@dataclass(slots=True)
class ServerState:
    settings: ServerSettings
    csrf: Csrf
    recorder: PhasedRecorder = field(default_factory=PhasedRecorder)
    first_request_at: float | None = None  # wall clock: when the load began, for the harness
    # A count, not a list: the accounting is the load generator's and the ledger's, and a
    # list of every job would grow for as long as the server runs.
    accepted: int = 0
    refused: int = 0  # valid forms the API or broker did not take
    sender: Sender | None = None  # opened with the app, closed after it

    def snapshot(self) -> dict[str, object]:
        snapshot: dict[str, object] = {
            "mode": self.settings.mode,
            "histograms": self.recorder.encoded(),
            "accepted": self.accepted,
            "refused": self.refused,
        }
        if self.sender is not None and self.sender.renderer is not None:
            snapshot["render"] = self.sender.renderer.describe()  # what it was calibrated to
        return snapshot


STATE = web.AppKey("state", ServerState)


async def _sender(app: web.Application) -> AsyncIterator[None]:
    """Open the mode's sender before the first request; close it after the last."""
    state = app[STATE]
    settings = state.settings
    context = SenderContext(
        mailgun=settings.mailgun,
        recorder=state.recorder,
        queue_url=settings.queue_url,
        queue_name=settings.queue_name,
        render_ms=settings.render_ms,
        framework_config=mode(settings.mode).config,
    )
    state.sender = await open_sender(mode(settings.mode), context)
    yield
    await state.sender.aclose()


async def _write_metrics(app: web.Application) -> AsyncIterator[None]:
    """Follow the run's phases while serving; at shutdown write the metrics file (the
    main phase's histograms, the accepted count) and a file per other phase."""
    state = app[STATE]
    phases = PhaseFile(state.settings.phase_file, state.recorder)
    phases.check()
    following = asyncio.create_task(phases.follow(), name="mailbench-phases")
    yield
    following.cancel()
    await asyncio.wait({following})
    if state.settings.metrics_out is not None:
        write_phases(state.settings.metrics_out, state.recorder, state.snapshot())


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _json_dumps(payload: object) -> str:
    """JSON with ``<``, ``>`` and ``&`` escaped: error messages quote the client's input,
    and a reply sniffed or embedded as HTML must not turn it into markup."""
    text = json.dumps(payload)
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text


def _json(payload: Mapping[str, object], status: int) -> web.Response:
    return web.json_response(payload, status=status, dumps=_json_dumps)


def _visitor_token(request: web.Request) -> tuple[str, str | None]:
    """A CSRF token for the visitor's cookie, and the cookie to set if they have none."""
    csrf = request.app[STATE].csrf
    cookie = csrf.cookie_in(request.headers.get(hdrs.COOKIE, ""))
    if cookie is not None:
        return csrf.token(cookie), None
    cookie = csrf.new_cookie()
    return csrf.token(cookie), cookie


def _html(body: str | bytes, status: int, new_cookie: str | None) -> web.Response:
    response = web.Response(
        body=body.encode() if isinstance(body, str) else body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=_HTML_HEADERS,
    )
    if new_cookie is not None:
        response.headers[hdrs.SET_COOKIE] = Csrf.set_cookie_header(new_cookie)
    return response


def _refuse(
    request: web.Request,
    status: int,
    message: str,
    field: str | None = None,
    values: Mapping[str, object] | None = None,
) -> web.Response:
    """A POST that is not taken: JSON, or the form again with the message, the values
    the visitor typed (escaped) and a fresh token, so nothing they wrote is lost."""
    if _wants_json(request):
        payload = {"error": message} if field is None else {"error": message, "field": field}
        return _json(payload, status)
    token, new_cookie = _visitor_token(request)
    return _html(render_form(values, error=message, csrf_token=token), status, new_cookie)


async def form_page(request: web.Request) -> web.Response:
    """The benchmark's control request: a pre-rendered page plus one signed token."""
    state = request.app[STATE]
    _note_first_request(state)
    busy(state.settings.form_work_us)
    token, new_cookie = _visitor_token(request)
    return _html(empty_form(token), 200, new_cookie)


def busy(us: float) -> None:
    """Spend ``us`` µs of wall-clock time computing, holding the event loop: a known
    slowdown finer than a sleep, which the loop rounds up to a millisecond."""
    if us > 0:
        deadline = time.perf_counter() + us / 1e6
        while time.perf_counter() < deadline:
            pass


def _note_first_request(state: ServerState) -> None:
    # The load's first request starts its warm-up, here as in the load generator.
    if state.first_request_at is None:
        state.first_request_at = time.time()


def _single(form: Form, name: str) -> str | None:
    values = form.getall(name, [])
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


async def send(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _note_first_request(state)
    try:
        data = await read_form(request)
    except BodyError as exc:
        return _refuse(request, exc.status, exc.message)
    try:
        cookie = state.csrf.cookie_in(request.headers.get(hdrs.COOKIE, ""))
        state.csrf.check(cookie, _single(data, CSRF_FIELD))
    except CsrfError as exc:
        return _refuse(request, 403, exc.message, CSRF_FIELD, data)
    try:
        form = validate(data)
    except FormError as exc:
        return _refuse(request, 400, exc.message, exc.field, data)

    job = Job(
        id=uuid.uuid4().hex,
        email=Email(to=form.to, subject=form.subject, text=form.message),
        enqueued_at=time.time(),
    )
    if state.settings.send_delay_ms:
        await asyncio.sleep(state.settings.send_delay_ms / 1000)
    busy(state.settings.send_work_us)
    assert state.sender is not None
    handed = await state.sender.hand(job)
    if not handed.accepted:
        state.refused += 1
        if _wants_json(request):
            return _json({"error": handed.detail, "job_id": job.id}, handed.status)
        return _refuse(request, handed.status, handed.detail, values=data)
    state.accepted += 1
    if _wants_json(request):
        return _json({"status": handed.state, "job_id": job.id}, handed.status)
    title = "Sent" if handed.state == "sent" else "Queued"
    page = render_done(title, f"Your email to {form.to} is {handed.state} (job {job.id}).")
    return _html(page, handed.status, None)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({**state.snapshot(), "identity": state.settings.identity})


async def phase(request: web.Request) -> web.Response:
    """The phase of the run figures go to now, and when the first request came (None
    before it): the harness ends the warm-up from it (:mod:`servers.phases`)."""
    state = request.app[STATE]
    return web.json_response(
        {"phase": state.recorder.current, "first_request_at": state.first_request_at}
    )


async def depth(request: web.Request) -> web.Response:
    """Jobs waiting in the queue, as the broker counts them (queued modes only)."""
    sender = request.app[STATE].sender
    queue = sender.queue if sender is not None else None
    if queue is None:
        return web.json_response({"error": "this mode has no queue"}, status=404)
    try:
        return web.json_response({"depth": await queue.depth()})
    except MailbenchError as exc:
        return web.json_response({"error": str(exc)}, status=503)


@web.middleware
async def server_timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the client the handler's own time, in a W3C ``Server-Timing`` header
    (``app;dur=<ms>``): the load generator records it beside its own time for the request,
    so the network, HTTP parsing and waiting for the event loop show as the difference."""
    began = time.perf_counter()
    response = await handler(request)
    if not response.prepared:  # a streamed response has sent its headers already
        took_ms = (time.perf_counter() - began) * 1000
        response.headers["Server-Timing"] = f"app;dur={took_ms:.3f}"
    return response


def create_app(settings: ServerSettings) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, client_max_fields=MAX_FIELDS, middlewares=[server_timing]
    )
    csrf = Csrf(settings.csrf_secret) if settings.csrf_secret else Csrf.from_environment(os.environ)
    app[STATE] = ServerState(settings, csrf)
    app.cleanup_ctx.append(_write_metrics)
    app.cleanup_ctx.append(_sender)
    app.router.add_get("/", form_page)
    app.router.add_post("/send", send)
    app.router.add_get("/_mailbench/metrics", metrics)
    app.router.add_get("/_mailbench/depth", depth)
    app.router.add_get("/_mailbench/phase", phase)
    return app


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=list(MODES), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    add_mailgun_arguments(parser)
    parser.add_argument(
        "--queue-url",
        help=f"queue backend URL for the queued modes (default: ${QUEUE_URL_VAR}; on a "
        "command line, ps shows its password to everyone)",
    )
    parser.add_argument("--queue-name", default="mailbench", help="queue to send jobs to")
    parser.add_argument(
        "--metrics-out", type=Path, help="write histograms and the accepted count here at shutdown"
    )
    parser.add_argument(
        "--inject-send-delay-ms",
        type=float,
        default=0.0,
        help="add a known delay to every POST /send (for testing the CI gate)",
    )
    for page in ("send", "form"):
        parser.add_argument(
            f"--inject-{page}-work-us",
            type=float,
            default=0.0,
            metavar="US",
            help=f"spend US µs computing in every {'POST /send' if page == 'send' else 'GET /'}"
            ", the event loop held (a known slowdown, for testing the CI gate)",
        )
    parser.add_argument(
        "--render-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="render a personalised card per email inside the request (direct and blocking "
        "modes), calibrated to about MS ms of CPU (default: 0, off)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with other server processes (SO_REUSEPORT; the kernel spreads "
        "connections over them)",
    )
    add_phase_argument(parser)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerSettings:
    return ServerSettings(
        mode=args.mode,
        host=args.host,
        port=args.port,
        mailgun=mailgun_settings_from_args(args),
        queue_url=queue_url_from(args.queue_url, environ, "--queue-url"),
        queue_name=args.queue_name,
        metrics_out=args.metrics_out,
        phase_file=args.phase_file,
        send_delay_ms=args.inject_send_delay_ms,
        send_work_us=args.inject_send_work_us,
        form_work_us=args.inject_form_work_us,
        render_ms=args.render_ms,
        identity=identity_from(environ),
    )


def cli_main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, os.environ)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        backlog=4096,
        reuse_port=args.reuse_port,
        print=lambda _: print(
            f"mailbench serve ({settings.mode}) listening on http://{settings.host}:{settings.port}",
            flush=True,
        ),
    )
    return 0
