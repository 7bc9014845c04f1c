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

Before the load, the form page must answer (:meth:`Target.check_form_page`): a target
that is down is one sentence, not a run of failed requests.
* Each send goes to an address used for nothing else; the app must mail exactly that
  recipient. That is how the ledger ties deliveries to sends, with no cooperation from
  the app beyond sending the email it was asked to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from harness.errors import ConfigError
from harness.results.folder import host_port

DEFAULT_FAKEGUN_PORT = 8025
FREE_PORT = "started on any free port"  # --fakegun-port 0
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
        }
