"""The latency models: their samples follow the distribution their spec names."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from servers.fakegun.latency import (
    DEFAULT_LATENCY,
    Fixed,
    LatencySpecError,
    LogNormal,
    Replay,
    Uniform,
    parse_latency,
)

N = 20_000


def draw(spec: str, seed: int = 7, n: int = N) -> list[float]:
    model = parse_latency(spec, seed)
    return [model.sample() for _ in range(n)]


def quantile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def test_fixed_is_exact() -> None:
    model = parse_latency("fixed:0.75", 1)
    assert isinstance(model, Fixed)
    assert {model.sample() for _ in range(100)} == {0.75}
    assert model.mean() == 0.75
    assert model.percentile(0) == model.percentile(99.9) == 0.75


def test_uniform_matches_its_mean_and_quantiles() -> None:
    samples = draw("uniform:0.5,1.0")
    model = parse_latency("uniform:0.5,1.0")
    assert isinstance(model, Uniform)
    assert min(samples) >= 0.5 and max(samples) <= 1.0
    # Standard error of the mean is 0.144/sqrt(20000) = 0.001 s; of a quantile ~0.0018 s.
    assert statistics.fmean(samples) == pytest.approx(0.75, abs=0.005)
    for p in (10, 50, 90, 99):
        assert quantile(samples, p) == pytest.approx(model.percentile(p), abs=0.01)
    assert model.mean() == 0.75
    assert model.percentile(50) == 0.75
    assert model.percentile(99) == pytest.approx(0.995)


def test_default_is_uniform_half_to_one_second() -> None:
    assert DEFAULT_LATENCY == "uniform:0.5,1.0"
    assert parse_latency(DEFAULT_LATENCY).describe() == "uniform:0.5,1.0"


def test_lognormal_median_is_exp_mu_and_sigma_is_the_log_spread() -> None:
    samples = draw("lognormal:median=0.7,sigma=0.4")
    model = parse_latency("lognormal:median=0.7,sigma=0.4")
    assert statistics.median(samples) == pytest.approx(0.7, rel=0.02)
    assert statistics.stdev(math.log(s) for s in samples) == pytest.approx(0.4, rel=0.03)
    assert model.percentile(50) == pytest.approx(0.7)
    assert model.mean() == pytest.approx(0.7 * math.exp(0.4**2 / 2))
    assert statistics.fmean(samples) == pytest.approx(model.mean(), rel=0.02)


def test_lognormal_redraws_above_max_and_the_percentiles_are_those_of_the_truncation() -> None:
    # max=1.0 cuts ~19% of the untruncated mass, so clamping and re-drawing differ plainly.
    spec = "lognormal:median=0.7,sigma=0.4,max=1.0"
    samples = draw(spec)
    model = parse_latency(spec)
    assert max(samples) <= 1.0
    assert samples.count(1.0) == 0  # re-drawn, not clamped onto max
    # Conditioning moves the median below the untruncated 0.7.
    assert model.percentile(50) < 0.69
    for p in (10, 50, 90):
        assert quantile(samples, p) == pytest.approx(model.percentile(p), rel=0.02)
    assert model.percentile(100) == pytest.approx(1.0)
    assert statistics.fmean(samples) == pytest.approx(model.mean(), rel=0.01)
    assert model.mean() < 0.7 * math.exp(0.4**2 / 2)


def test_lognormal_with_a_far_max_is_barely_truncated() -> None:
    model = parse_latency("lognormal:median=0.7,sigma=0.4,max=5")
    assert model.percentile(50) == pytest.approx(0.7, rel=1e-6)
    assert model.describe() == "lognormal:median=0.7,sigma=0.4,max=5.0"


def test_replay_samples_the_file_uniformly(tmp_path: Path) -> None:
    path = tmp_path / "observed.txt"
    path.write_text("# seconds, as measured\n0.5\n\n0.6  # a comment\n0.9\n1.2\n")
    model = parse_latency(f"replay:{path}", 3)
    assert isinstance(model, Replay)
    samples = [model.sample() for _ in range(N)]
    assert set(samples) == {0.5, 0.6, 0.9, 1.2}
    for value in (0.5, 0.6, 0.9, 1.2):
        assert samples.count(value) / N == pytest.approx(0.25, abs=0.02)
    assert model.mean() == pytest.approx(0.8)
    assert model.percentile(50) == 0.6  # nearest rank
    assert model.percentile(100) == 1.2
    assert model.describe() == f"replay:{path}"


@pytest.mark.parametrize(
    "spec",
    ["fixed:0.25", "uniform:0.5,1.0", "lognormal:median=0.7,sigma=0.4,max=5.0"],
)
def test_the_same_seed_draws_the_same_latencies(spec: str) -> None:
    assert draw(spec, seed=42, n=50) == draw(spec, seed=42, n=50)
    if not spec.startswith("fixed"):
        assert draw(spec, seed=42, n=50) != draw(spec, seed=43, n=50)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("fixed:0.75", "fixed:0.75"),
        (" uniform:0.5, 1 ", "uniform:0.5,1.0"),
        ("LOGNORMAL:sigma=0.4,median=0.7", "lognormal:median=0.7,sigma=0.4"),
    ],
)
def test_describe_is_canonical_and_reads_back(spec: str, canonical: str) -> None:
    model = parse_latency(spec)
    assert model.describe() == str(model) == canonical
    assert parse_latency(canonical).describe() == canonical


def test_models_can_be_built_directly() -> None:
    assert LogNormal(median=1.0, sigma=0.0).sample() == 1.0
    assert Uniform(low=0.1, high=0.1).percentile(90) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="between 0 and 100"):
        Fixed(seconds=1.0).percentile(101)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "0.75",
        "fixed",
        "fixed:",
        "fixed:abc",
        "fixed:-1",
        "fixed:nan",
        "fixed:inf",
        "fixed:1,2",
        "uniform:1",
        "uniform:1,0.5",
        "uniform:0.5,1.0,2",
        "lognormal:median=0.7",
        "lognormal:median=0,sigma=0.4",
        "lognormal:median=0.7,sigma=0.4,max=0.1",
        "lognormal:mu=1,sigma=1",
        "lognormal:median=0.7,median=0.8,sigma=1",
        "gaussian:1",
        "replay:",
        "replay:/nonexistent/latencies.txt",
    ],
)
def test_malformed_specs_name_the_accepted_forms(spec: str) -> None:
    with pytest.raises(LatencySpecError) as caught:
        parse_latency(spec)
    message = str(caught.value)
    assert "fixed:0.75" in message and "uniform:0.5,1.0" in message and "replay:PATH" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", ["", "# only a comment\n\n", "0.5\nfast\n", "0.5\n-1\n"])
def test_replay_files_without_valid_latencies_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(LatencySpecError, match="replay"):
        parse_latency(f"replay:{path}")
