"""Locust scenarios: what load, never what system (the harness picks the mode)."""
