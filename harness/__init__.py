"""mailbench: what sending email inside a web request costs, measured."""

__version__ = "0.1.0"
