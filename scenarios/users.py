"""The behaviours scenarios are made of, and the closed-model users that run them.

A behaviour is a function of an HTTP client, so the same visit runs in a closed-model
user (which waits between visits) and in an open-model arrival (started on a schedule,
see :mod:`scenarios.arrivals`). ``context`` travels with the request to the ``request``
event; an open-model arrival puts its intended start there.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from locust import FastHttpUser, between, task

_recipients = itertools.count()


def read_form(client: Any, context: dict[str, Any] | None = None) -> None:
    """A visitor loads the email form."""
    with client.get("/", name="form", catch_response=True, context=context or {}) as response:
        if response.status_code == 200 and b"<form" not in (response.content or b""):
            response.failure("the page has no form")


def send_email(client: Any, context: dict[str, Any] | None = None) -> None:
    """A visitor loads the form, fills it in and posts it."""
    client.get("/", name="form", context=context or {})
    n = next(_recipients)
    form = {
        "to": f"reader{n}@example.com",
        "subject": f"Benchmark message {n}",
        "message": "Hello from mailbench. " * random.randint(1, 20),
    }
    with client.post(
        "/send",
        data=form,
        headers={"Accept": "application/json"},
        name="send",
        catch_response=True,
        context=context or {},
    ) as response:
        if response.status_code in (200, 202):
            try:
                job_id = response.json().get("job_id")
            except ValueError:
                job_id = None
            if not job_id:
                response.failure("accepted without a job id")
        else:
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
