"""The system under test: the reference web app and its senders, the queue worker, the
Mailgun client, the per-email render, the mode registry, and the fake Mailgun."""
