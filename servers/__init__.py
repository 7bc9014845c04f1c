"""The reference web app, the fake Mailgun and its latency models."""
