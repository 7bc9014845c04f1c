"""The fake Mailgun: the send endpoint of Mailgun's HTTP API, a latency model, faults and a
ledger.

:class:`~servers.fakegun.server.FakeMailgun` and its settings are in
:mod:`servers.fakegun.server` (it can start on port 0 inside a test), the command line
(``mailbench fakegun`` or ``python -m servers.fakegun``) in :mod:`servers.fakegun.cli`, and
the client of the admin API below in :mod:`servers.fakegun.admin`. With ``--port 0`` it
binds any free port and, given ``--port-file PATH``, writes the port it got there once it
listens.

``POST /v3/{domain}/messages`` answers as Mailgun does (401 plain ``Forbidden``, 404 for
an unknown domain, 400 JSON ``{"message": ...}``, 200 ``Queued. Thank you.``), after the
latency the model draws. The wait is measured from the request's arrival, so the time
spent parsing the body is absorbed and the achieved latency matches the model. Faults
and the rate limit are described in :mod:`servers.fakegun.faults`, the checks of a send
in :mod:`servers.fakegun.validate`.

With ``idempotency`` on (``--idempotency``; off by default, as Mailgun has no such key) a
send whose ``Idempotency-Key`` header (else ``v:idempotency_key`` variable) was already
accepted gets the first answer again and is not delivered twice.

Every accepted message goes into the ledger (:mod:`servers.fakegun.ledger`), the ground
truth the harness counts deliveries, duplicates and loss against. Admin paths, without
auth (a contract the harness relies on):

* ``GET /_mailbench/ledger`` → ``{"entries": [LedgerEntry.as_json(), ...]}``
* ``GET /_mailbench/stats`` → ``{"received", "accepted", "unique_keys", "duplicates",
  "in_flight", "by_status": {"200": n, ...}, "faults": {"503": n, ...}, "latency": spec,
  "delivered", "testmode", "replayed", "rate_limited", "identity"}``; ``identity`` is the
  token the harness started it with (:mod:`servers.identity`), ``null`` if none
* ``POST /_mailbench/reset`` → ``{"ok": true}``; clears the ledger, the counters and the
  rate limit's bucket.

``received`` counts every send request, ``accepted`` every ledger entry (test mode ones
too), ``delivered`` the entries not in test mode. ``unique_keys`` and ``duplicates``
(extra deliveries of a key) are over delivered entries that carry an idempotency key.
``replayed`` counts the answers idempotency repeated instead of delivering again.
``faults`` has every configured kind, counted when the fault hits (a ``malformed`` one
only when it garbles a 200); ``rate_limited`` counts the 429s of the rate limit,
which ``faults["429"]`` (the injected ones) leaves out. ``by_status`` counts the statuses
answered, both kinds of 429 included; connection faults answer none.
"""
