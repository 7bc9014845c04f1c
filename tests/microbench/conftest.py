"""Micro-benchmarks of the hot paths (``make microbench``).

In a plain ``pytest`` run (``make test``) every benchmark body runs once, unmeasured, as an
ordinary test: the hot paths still work, and the suite pays milliseconds. Only when a
benchmark option is given (``--benchmark-enable``, ``--benchmark-autosave``, ...) are
they timed, as ``make microbench`` does.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

MEASURING_OPTIONS = (
    "benchmark_enable",
    "benchmark_autosave",
    "benchmark_save",
    "benchmark_json",
    "benchmark_compare",
    "benchmark_only",
)


@pytest.fixture
def benchmark(benchmark: BenchmarkFixture, request: pytest.FixtureRequest) -> BenchmarkFixture:
    if not any(request.config.getoption(name) for name in MEASURING_OPTIONS):
        benchmark.disabled = True
    return benchmark
