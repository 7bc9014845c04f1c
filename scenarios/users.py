"""The users that scenarios are made of. One class per behaviour."""

from __future__ import annotations

import itertools
import random

from locust import FastHttpUser, between, task

_recipients = itertools.count()


class FormReader(FastHttpUser):
    """Loads the email form now and then, like most visitors."""

    abstract = True
    weight = 9
    wait_time = between(0.05, 0.15)

    @task
    def read_form(self) -> None:
        with self.client.get("/", name="form", catch_response=True) as response:
            if response.status_code == 200 and b"<form" not in (response.content or b""):
                response.failure("the page has no form")


class EmailSender(FastHttpUser):
    """Loads the form, fills it in and posts it."""

    abstract = True
    weight = 1
    wait_time = between(0.5, 1.5)

    @task
    def send_email(self) -> None:
        self.client.get("/", name="form")
        n = next(_recipients)
        form = {
            "to": f"reader{n}@example.com",
            "subject": f"Benchmark message {n}",
            "message": "Hello from mailbench. " * random.randint(1, 20),
        }
        with self.client.post(
            "/send",
            data=form,
            headers={"Accept": "application/json"},
            name="send",
            catch_response=True,
        ) as response:
            if response.status_code in (200, 202):
                body = response.json()
                if not body.get("job_id"):
                    response.failure("accepted without a job id")
            else:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
