"""Task-queue frameworks (Celery, RQ, ...) on the reference server: the contract.

A framework mode changes only the queue: the reference aiohttp server's ``POST /send``
enqueues through the framework, and the framework's *own* worker process (a
``celery worker``, an RQ worker pool) runs a task that sends through the project's
Mailgun client. What every framework's code here keeps, so that the harness's figures
and accounting hold for it unchanged:

* **The job.** The task's one argument is the job as :func:`queues.base.encode_job`
  writes it, and the framework's job id *is* the job's id, which every API call sends as
  the idempotency key, on every attempt. A job delivered twice by the framework is then
  one email in the fake's ledger and one duplicate delivery, as with mailbench's queues.
* **The 2xx promise.** The sender returns (and the server answers 202) only once the
  framework's broker has accepted the job: the Redis command's reply, a RabbitMQ
  publisher confirm (``confirm_publish``), the commit to huey's SQLite file. Where a
  framework cannot give that, its module says so.
* **The task** (:class:`TaskRuntime.deliver`): renders the card as mailbench's worker
  does (``--render-ms``), calls the API once, waits a 429 out in place for its
  ``Retry-After`` (up to ``--rate-limit-waits`` times, as :mod:`servers.worker` does),
  and says what the framework should do next: nothing (sent), retry after a delay (with
  the framework's own mechanism), or give up. Giving up — a permanent failure, or the
  last attempt failed — appends a line to the dead-letters journal
  (``--dead-letters-out``, the format the harness reads) *before* the framework is told,
  so the job counts as dead-lettered, never as lost.
* **The worker's figures.** Each worker process started by the harness writes the file
  ``--metrics-out`` names at shutdown, with the same histograms (``api`` by outcome,
  ``queue_wait``, ``render``, by phase of the run) and counts as mailbench's worker.
* **The configuration** (``--config``): ``default``, the framework as it ships, or
  ``reliable``, what its docs recommend so that an accepted job survives a worker crash
  and a broker restart. Each framework's module lists both.
* **The depth probe** (``open_depth(url, queue_name)``): jobs still to be sent, for the
  harness's timeline and drain.

One module per framework: :mod:`servers.frameworks.celery`, :mod:`servers.frameworks.rq`,
:mod:`servers.frameworks.dramatiq`, :mod:`servers.frameworks.huey`;
:mod:`servers.frameworks.procrastinate` (whose task is a coroutine:
:class:`~servers.frameworks.task.AsyncTaskRuntime`);
:mod:`servers.frameworks.arq` (in a venv of its own: see :attr:`servers.modes.Mode.python`);
their senders are in :mod:`servers.senders`. ``docs/frameworks.md`` says why each is
configured as it is.
"""
