import random

import numpy as np

from servers.metrics import (
    HIGHEST_US,
    Recorder,
    Summary,
    clamped,
    decode,
    encode,
    mean_us,
    merge,
    new_histogram,
    record_us,
)


def test_microsecond_values_survive_encoding() -> None:
    h = new_histogram()
    for value in (150, 151, 152, 750_000):
        record_us(h, value)
    back = decode(encode(h))
    assert back.get_total_count() == 4
    assert back.get_value_at_percentile(50) == 151
    assert abs(back.get_max_value() - 750_000) <= 750_000 * 0.001


def test_out_of_range_values_are_clamped_not_dropped() -> None:
    h = new_histogram()
    record_us(h, 0.2)
    record_us(h, 10 * HIGHEST_US)
    assert h.get_total_count() == 2
    assert h.get_min_value() == 1


def test_a_chaos_drain_of_five_minutes_is_recorded_as_it_was() -> None:
    h = new_histogram()
    record_us(h, 300 * 1e6)  # a job that waited out a 300 s drain
    record_us(h, 59 * 60 * 1e6)
    assert abs(h.get_max_value() - 59 * 60 * 1e6) <= 59 * 60 * 1e6 * 0.001
    assert abs(h.get_value_at_percentile(50) - 300 * 1e6) <= 300 * 1e6 * 0.001
    assert clamped(h) == 0


def test_values_above_an_hour_are_counted_as_clamped() -> None:
    h = new_histogram()
    for micros in (150, 2 * 3600 * 1e6, 10 * 3600 * 1e6):
        record_us(h, micros)
    assert clamped(h) == 2
    assert clamped(decode(encode(h))) == 2  # the count survives the results folder
    assert h.get_total_count() == 3


def test_merging_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(6, 1.5) for _ in range(20_000)]
    whole = new_histogram()
    parts = [new_histogram() for _ in range(4)]
    for i, v in enumerate(values):
        record_us(whole, v)
        record_us(parts[i % 4], v)
    merged = merge(decode(encode(p)) for p in parts)
    assert Summary.of(merged) == Summary.of(whole)
    # averaging the parts' p99 is not the p99 of the whole; merging is
    assert merged.get_value_at_percentile(99) == whole.get_value_at_percentile(99)


def test_recorder_add_encoded_merges_by_name() -> None:
    a, b = Recorder(), Recorder()
    a.record("form", 0.000150)
    b.record("form", 0.000250)
    b.record("send", 0.5)
    a.add_encoded(b.encoded())
    assert a.histograms["form"].get_total_count() == 2
    assert a.histograms["send"].get_total_count() == 1


def test_summary_of_empty_histogram_is_zero() -> None:
    assert Summary.of(new_histogram()).count == 0


def test_the_fast_mean_is_hdrhs_mean() -> None:
    """summary.csv's mean: the same number as hdrh's own, from the non-empty buckets."""
    for seed in range(3):
        histogram = new_histogram()
        for value in np.random.default_rng(seed).lognormal(7 + 2 * seed, 1.0, 3000):
            record_us(histogram, float(value))
        assert mean_us(histogram) == histogram.get_mean_value()
    assert mean_us(new_histogram()) == 0.0
