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
  default), or uses one already running at ``--fakegun-url``.
* Each send goes to an address used for nothing else; the app must mail exactly that
  recipient. That is how the ledger ties deliveries to sends, with no cooperation from
  the app beyond sending the email it was asked to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from harness.errors import ConfigError

DEFAULT_FAKEGUN_PORT = 8025


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

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--target {self.url!r} is not an http(s) URL, e.g. http://h:8080")
        for option, path in (("--form-path", self.form_path), ("--send-path", self.send_path)):
            if not path.startswith("/"):
                raise ConfigError(f"{option} {path!r} must start with '/'")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--target-name {self.name!r}: use letters, digits, - and _")

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
            "form_path": self.form_path,
            "send_path": self.send_path,
            "fields": [self.field_to, self.field_subject, self.field_message],
            "fakegun": self.fakegun_url or f"started on port {self.fakegun_port}",
        }
