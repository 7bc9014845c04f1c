"""The CI gate: compare runs, and measure baseline and candidate side by side."""
