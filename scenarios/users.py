"""The behaviours scenarios are made of, and the closed-model users that run them.

A behaviour is a function of an HTTP client, so the same visit runs in a closed-model
user (which waits between visits) and in an open-model arrival (started on a schedule,
see :mod:`scenarios.arrivals`). ``context`` travels with the request to the ``request``
event; an open-model arrival puts its intended start there.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from locust import FastHttpUser, between, events, task
from locust.env import Environment

from scenarios.recorder import note_send, request_starting

_recipients = itertools.count()
# Chosen once per process, and again in every child forked from it: Locust's
# --processes N forks its workers after importing this module, and the accounting needs
# every recipient to be unique across all of them (and across machines).
_PROCESS_TOKEN = secrets.token_hex(4)


def _new_process_token() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_process_token)
# The reference server's form carries a CSRF token bound to a cookie; other servers may
# have neither, and then the form is posted without them.
_CSRF_FIELD = re.compile(rb'name="csrf_token"[^>]*?value="([^"]*)"')
_CSRF_COOKIE = re.compile(r"(?:^|[\s,])(mailbench_csrf=[^;,\s]*)")


@dataclass(frozen=True, slots=True)
class Site:
    """Where the form is and what its fields are called: the reference server's by
    default, another app's with ``mailbench run --target`` (see :mod:`harness.run.target`)."""

    form_path: str = "/"
    send_path: str = "/send"
    to: str = "to"
    subject: str = "subject"
    message: str = "message"


SITE = Site()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    defaults = Site()
    for name, default in (
        ("form-path", defaults.form_path),
        ("send-path", defaults.send_path),
        ("field-to", defaults.to),
        ("field-subject", defaults.subject),
        ("field-message", defaults.message),
    ):
        parser.add_argument(f"--{name}", default=default, include_in_web_ui=False)


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    global SITE
    options = environment.parsed_options
    if options is not None:
        SITE = Site(
            options.form_path,
            options.send_path,
            options.field_to,
            options.field_subject,
            options.field_message,
        )


Behaviour = TypeVar("Behaviour", bound=Callable[..., None])
# The requests each behaviour makes, in order (the open model counts the unanswered ones).
REQUESTS: dict[Callable[..., None], tuple[str, ...]] = {}


def makes(*requests: str) -> Callable[[Behaviour], Behaviour]:
    """Declare the requests (by ``name=``) a behaviour makes, in order."""

    def declare(behaviour: Behaviour) -> Behaviour:
        REQUESTS[behaviour] = requests
        return behaviour

    return declare


@makes("form")
def read_form(client: Any, context: dict[str, Any] | None = None) -> None:
    """A visitor loads the email form."""
    request_starting()
    with client.get(
        SITE.form_path, name="form", catch_response=True, context=context or {}
    ) as response:
        if response.status_code == 200 and b"<form" not in (response.content or b""):
            response.failure("the page has no form")


@makes("form", "send")
def send_email(client: Any, context: dict[str, Any] | None = None) -> None:
    """A visitor loads the form, fills it in and posts it.

    The POST carries the form's CSRF token and the cookie it is bound to. The cookie jar
    of the client would send the cookie anyway, but an open-model scheduler shares one
    client among many concurrent visits: two first visits can each be given a new cookie,
    and the jar keeps only the last, so the cookie this page set is sent explicitly.

    In the open model the POST is due the moment the page arrived, had the visit started
    on time: its intended start is the visit's plus the time the GET took. The GET's own
    slowness is the form's figure; charging it to the send too would count it twice.
    """
    context = context or {}
    request_starting()
    began = time.perf_counter()
    page = client.get(SITE.form_path, name="form", context=context)
    post_context = dict(context)
    if context.get("intended") is not None:
        post_context["intended"] = context["intended"] + (time.perf_counter() - began)
    n = next(_recipients)
    to = f"reader{n}.{_PROCESS_TOKEN}@example.com"
    form = {
        SITE.to: to,
        SITE.subject: f"Benchmark message {n}",
        SITE.message: "Hello from mailbench. " * random.randint(1, 20),
    }
    headers = {"Accept": "application/json"}
    token = _CSRF_FIELD.search(page.content or b"")
    if token:
        form["csrf_token"] = token.group(1).decode()
        cookie = _CSRF_COOKIE.search(page.headers.get("Set-Cookie") or "")
        if cookie:
            headers["Cookie"] = cookie.group(1)
    note_send(to)
    with client.post(
        SITE.send_path,
        data=form,
        headers=headers,
        name="send",
        catch_response=True,
        context={**post_context, "recipient": to},
    ) as response:
        # Any 2xx is the server's promise to deliver (after any redirect it asked for).
        if not 200 <= (response.status_code or 0) < 300:
            response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")


class FormReader(FastHttpUser):
    """Loads the email form now and then, like most visitors."""

    abstract = True
    weight = 9
    wait_time = between(0.05, 0.15)

    @task
    def read(self) -> None:
        read_form(self.client)


class EmailSender(FastHttpUser):
    """Loads the form, fills it in and posts it."""

    abstract = True
    weight = 1
    wait_time = between(0.2, 0.6)

    @task
    def send(self) -> None:
        send_email(self.client)
