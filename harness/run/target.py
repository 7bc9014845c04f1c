"""An external server under test: ``mailbench run --target URL``.

Any web app can be measured with mailbench's scenarios, accounting and charts if it
honours a small contract (docs/target.md):

* ``GET <form path>`` (default ``/``) answers 200 with the form page. If the page holds a
  hidden ``csrf_token`` input, its value (and the cookies set with it) is sent back.
* ``POST <send path>`` (default ``/send``) takes an ``application/x-www-form-urlencoded``
  body with the recipient, subject and message fields (names configurable, default
  ``to``, ``subject``, ``message``) and answers 2xx once the email is sent or durably
  queued — the promise the accounting checks. Any other status is a failed send.
* The app sends through the Mailgun HTTP API at the fake Mailgun's URL: the harness
  starts one on ``--fakegun-port`` (default 8025, where ``mailbench serve`` sends by
  default; 0: any free port, which the run prints and records), or uses one already
  running at ``--fakegun-url``. A port held by anything else is an error.

* Each send goes to an address used for nothing else; the app must mail exactly that
  recipient. That is how the ledger ties deliveries to sends, with no cooperation from
  the app beyond sending the email it was asked to send.

Before the load, the form page must answer (:meth:`Target.check_form_page`): a target
that is down is one sentence, not a run of failed requests.

The harness may also start the target's processes itself, from ``--server-cmd`` and
``--worker-cmd`` (:meth:`Target.command`): then it can stop them, and ``mailbench chaos``
can kill them. Each gets the environment variables of :meth:`Target.environment`, which
also fill in ``$NAME`` or ``${NAME}`` in the command's words.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from harness.errors import ConfigError
from harness.results.folder import host_port

DEFAULT_FAKEGUN_PORT = 8025
FREE_PORT = "started on any free port"  # --fakegun-port 0
# What a target's processes started with --server-cmd / --worker-cmd are told.
MAILGUN_URL_VAR = "MAILBENCH_MAILGUN_URL"  # the fake's base URL: http://127.0.0.1:PORT
MAILGUN_KEY_VAR = "MAILGUN_API_KEY"  # the key the fake accepts
PORT_VAR = "MAILBENCH_PORT"  # the --target URL's port, where a server must listen
INDEX_VAR = "MAILBENCH_PROCESS_INDEX"  # 0, 1, ...: the process's number in its tier
SECRET_VAR = "MAILBENCH_SECRET"  # one secret for every server process (CSRF, sessions)

LABEL_CHARS = 100  # a table cell and a chart's legend line, not a paragraph


def label_fits(label: str) -> bool:
    """A label that reads in a Markdown table cell and on one line of a chart: no line
    break or control character, no ``|`` (a cell's edge) or backquote (code)."""
    text = label.strip()
    return 0 < len(text) <= LABEL_CHARS and text.isprintable() and not any(c in text for c in "|`")


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    name: str = "target"
    form_path: str = "/"
    send_path: str = "/send"
    field_to: str = "to"
    field_subject: str = "subject"
    field_message: str = "message"
    fakegun_port: int = DEFAULT_FAKEGUN_PORT
    fakegun_url: str | None = None  # a fake Mailgun already running: not started
    server_cmd: tuple[str, ...] = ()  # the harness starts the target's servers with it
    worker_cmd: tuple[str, ...] = ()  # and its workers with this
    # What the stack is, in the user's words ("Django + Celery 5.4 on Redis"): the name
    # every report, chart and comparison gives it; absent, the URL's host:port.
    label: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--target {self.url!r} is not an http(s) URL, e.g. http://h:8080")
        for option, path in (("--form-path", self.form_path), ("--send-path", self.send_path)):
            if not path.startswith("/"):
                raise ConfigError(f"{option} {path!r} must start with '/'")
        if not 0 <= self.fakegun_port <= 65535:
            raise ConfigError(f"--fakegun-port {self.fakegun_port}: use 0 (any free port) to 65535")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--target-name {self.name!r}: use letters, digits, - and _")
        if self.label is not None and not label_fits(self.label):
            raise ConfigError(
                f"--target-label {self.label!r}: give one line of at most {LABEL_CHARS} "
                "characters without '|' or '`', e.g. 'Django + Celery 5.4 on Redis'"
            )

    @property
    def form_url(self) -> str:
        return self.url.rstrip("/") + self.form_path

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def environment(self, fake_url: str, api_key: str, secret: str, index: int) -> dict[str, str]:
        """What a server or worker the harness starts for this target is told."""
        return {
            MAILGUN_URL_VAR: fake_url,
            MAILGUN_KEY_VAR: api_key,
            PORT_VAR: str(self.port),
            INDEX_VAR: str(index),
            SECRET_VAR: secret,
        }

    def command(self, tier: str, env: Mapping[str, str]) -> list[str]:
        """``--server-cmd`` or ``--worker-cmd`` (``tier``), its ``$NAME`` words filled in
        from ``env``; a name it does not hold stays as written."""
        argv = self.server_cmd if tier == "server" else self.worker_cmd
        return [string.Template(word).safe_substitute(env) for word in argv]

    def check_form_page(self, timeout: float = 10.0) -> None:
        """Fail with one sentence unless the form page answers 200 with a ``<form``, as the
        scenarios expect of it (:func:`scenarios.users.read_form`)."""
        url = self.form_url
        try:
            response = httpx.get(url, timeout=timeout, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"The target's form page {url} does not answer ({exc or type(exc).__name__}): "
                "start the server first, or correct --target or --form-path."
            ) from exc
        if response.status_code != 200 or b"<form" not in response.content:
            got = f"HTTP {response.status_code}" if response.status_code != 200 else "no <form"
            raise ConfigError(
                f"The target's form page {url} answered with {got}, not 200 with a form: "
                "correct --target or --form-path."
            )

    def locust_options(self) -> list[str]:
        """How the scenarios reach this server (see :mod:`scenarios.users`)."""
        return [
            "--form-path",
            self.form_path,
            "--send-path",
            self.send_path,
            "--field-to",
            self.field_to,
            "--field-subject",
            self.field_subject,
            "--field-message",
            self.field_message,
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "name": self.name,
            "label": self.label or host_port(self.url),
            "form_path": self.form_path,
            "send_path": self.send_path,
            "fields": [self.field_to, self.field_subject, self.field_message],
            "fakegun": self.fakegun_url
            or (f"started on port {self.fakegun_port}" if self.fakegun_port else FREE_PORT),
            "server_cmd": list(self.server_cmd),
            "worker_cmd": list(self.worker_cmd),
        }
