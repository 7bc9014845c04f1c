"""The open model: visits start on a schedule, whatever the server does.

Locust's users are a closed model — a user waits for its answer before the next visit,
so a slow server receives fewer requests and its slowness is under-reported
(coordinated omission). An :class:`ArrivalsUser` instead starts visits at ``R`` per
second (constant gaps or Poisson arrivals), each in its own greenlet, and every request
is timed twice: as service time (Locust's own measure, from when it was sent) and from
its *intended* start (recorded by :mod:`scenarios.recorder` as ``<name>_intended``).

At most ``--max-in-flight`` visits run at once, like a browser's or a client's
connection pool. A visit that cannot start on time waits for a slot and is counted as
*late*; when more than ``--max-backlog`` are waiting, new arrivals are *dropped* and
counted (as k6 counts ``dropped_iterations``); visits still waiting or running when the
test ends are counted as *unfinished*. Their latency from intended start is the whole
point: it keeps growing while the server cannot keep up.

When the load stops, the schedule stops too; visits still running get Locust's stop
timeout to finish. Then every request of a dropped or unfinished visit that never got an
answer is recorded in ``<name>_intended`` from its intended start until that moment (see
:class:`scenarios.record.Visit`), as failed requests are: a visit the server never served
is the slowest of all, not one that did not happen.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pool import Group
from locust import FastHttpUser, constant, events, task

from scenarios.record import Visit
from scenarios.recorder import record_unanswered
from scenarios.users import REQUESTS

log = logging.getLogger(__name__)

LATE_AFTER_S = 0.010  # a start more than 10 ms after its schedule is late
Behaviour = Callable[..., None]


class ArrivalsUser(FastHttpUser):
    abstract = True
    fixed_count = 1  # one scheduler per run; its rate is the whole offered load
    concurrency = 1000  # HTTP connections its visits share
    wait_time = constant(0)
    mix: ClassVar[tuple[tuple[int, Behaviour], ...]] = ()

    def on_start(self) -> None:
        self._visits = Group()  # their greenlets
        self._unanswered: set[Visit] = set()  # dropped, waiting or running
        self._stopping = False
        self.environment.events.test_stopping.add_listener(self._stop_scheduling)

    def _stop_scheduling(self, **_: Any) -> None:
        self._stopping = True

    def on_stop(self) -> None:
        # The stop timeout is over (or every visit finished): what is left never will.
        self.environment.events.test_stopping.remove_listener(self._stop_scheduling)
        self._visits.kill(block=True)
        now = time.perf_counter()
        for visit in self._unanswered:
            record_unanswered(visit, now)
        self._unanswered.clear()

    @task
    def schedule(self) -> None:
        options = self.environment.parsed_options
        rate = float(getattr(options, "arrival_rate", 0) or 0)
        if rate <= 0:
            log.warning("%s needs --arrival-rate R; it stays idle", type(self).__name__)
            gevent.sleep(3600)
            return
        poisson = getattr(options, "arrival_process", "poisson") == "poisson"
        max_in_flight = int(getattr(options, "max_in_flight", 1000))
        max_backlog = int(getattr(options, "max_backlog", 0) or rate * 30)
        counters = self.environment.mailbench_counters
        rng = random.Random(getattr(options, "arrival_seed", 1))
        weights = [w for w, _ in self.mix]
        behaviours = [v for _, v in self.mix]
        slots = BoundedSemaphore(max_in_flight)
        waiting = 0

        def run(visit: Visit, fn: Behaviour) -> None:
            nonlocal waiting
            waiting += 1
            try:
                slots.acquire()
            finally:
                waiting -= 1
            done = False
            try:
                started = time.perf_counter()
                visit.start(started)
                if started - visit.intended > LATE_AFTER_S:
                    counters["late_starts"] += 1
                fn(self.client, context={"intended": visit.intended, "visit": visit})
                counters["completed_starts"] += 1
                done = True
            finally:
                slots.release()
                if done:  # else it was cut short: on_stop records what it left unanswered
                    self._unanswered.discard(visit)

        next_start = time.perf_counter()
        while not self._stopping:
            delay = next_start - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
                if self._stopping:
                    break
            counters["scheduled_starts"] += 1
            fn = rng.choices(behaviours, weights)[0]
            visit = Visit(next_start, REQUESTS.get(fn, ()))
            self._unanswered.add(visit)
            if waiting >= max_backlog:
                counters["dropped_starts"] += 1
            else:
                self._visits.spawn(run, visit, fn)
            next_start += rng.expovariate(rate) if poisson else 1.0 / rate
        self._visits.join()  # Locust kills this wait when the stop timeout is over


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("mailbench open model")
    group.add_argument(
        "--arrival-rate",
        type=float,
        default=0.0,
        help="visits started per second by the Arrivals user (open model)",
    )
    group.add_argument(
        "--arrival-process",
        choices=("poisson", "constant"),
        default="poisson",
        help="exponential (Poisson) or constant gaps between starts",
    )
    group.add_argument("--arrival-seed", type=int, default=1, help="seed of the schedule")
    group.add_argument(
        "--max-in-flight",
        type=int,
        default=1000,
        help="visits running at once at most; later starts wait (late)",
    )
    group.add_argument("--max-backlog", type=int, default=0,
                       help="waiting starts beyond which arrivals are dropped "
                            "(default: 30 s of arrivals)")  # fmt: skip
