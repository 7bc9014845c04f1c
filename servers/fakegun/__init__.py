"""The fake Mailgun: its HTTP server, latency models, faults, ledger and command line."""
