"""Driving a run: configuration, tiers, Locust, the drain, chaos, the sweep."""
