from harness.results.accounting import reconcile


def entry(to: str | None, at: float, testmode: bool = False) -> dict[str, object]:
    return {"recipients": [to] if to else [], "accepted_at": at, "testmode": testmode}


def test_every_accepted_delivered_once() -> None:
    counts, lag = reconcile(
        [("a@x.test", 10.0), ("b@x.test", 11.0)], [entry("a@x.test", 10.5), entry("b@x.test", 12.0)]
    )
    assert counts.as_row() == {
        "accepted": 2,
        "delivered": 2,
        "duplicates": 0,
        "dead_lettered": 0,
        "lost": 0,
        "unexpected": 0,
        "unacknowledged": 0,
        "requests": 0,  # the load generator's, counted by collect_mode
        "failed_requests": 0,
    }
    assert counts.sound
    assert lag.get_total_count() == 2
    assert abs(lag.get_value_at_percentile(100) - 1_000_000) < 1_000_000 * 0.001


def test_lost_duplicate_unexpected_and_dead() -> None:
    accepted = [("a@x.test", 1.0), ("b@x.test", 1.0), ("c@x.test", 1.0), ("d@x.test", 1.0)]
    ledger = [
        entry("a@x.test", 2.0),
        entry("A@X.test", 3.0),  # delivered twice (addresses compare case-folded)
        entry("zzz@x.test", 2.0),  # nobody sent this one
        entry(None, 2.0),  # no recipient at all
        entry("b@x.test", 2.0, testmode=True),  # test mode is not a delivery
    ]
    counts, lag = reconcile(accepted, ledger, dead_lettered=["c@x.test", "zzz@x.test"])
    assert counts.delivered == 1
    assert counts.duplicates == 1
    assert counts.unexpected == 2
    assert counts.dead_lettered == 1
    assert counts.lost == 2  # b (test mode only) and d
    assert not counts.sound
    # delivery lag counts the first delivery only
    assert lag.get_total_count() == 1
    assert abs(lag.get_value_at_percentile(50) - 1_000_000) < 1_000


def test_dead_letter_after_delivery_is_not_double_counted() -> None:
    counts, _ = reconcile([("a@x.test", 1.0)], [entry("a@x.test", 2.0)], dead_lettered=["a@x.test"])
    assert (counts.delivered, counts.dead_lettered, counts.lost) == (1, 0, 0)


def test_a_send_without_a_2xx_that_was_delivered_is_unacknowledged_not_unexpected() -> None:
    # The reply was cut off (end of the run, a crash) after the job was taken.
    counts, lag = reconcile(
        [("a@x.test", 1.0)],
        [entry("a@x.test", 2.0), entry("b@x.test", 2.0), entry("b@x.test", 2.5)],
        failed=["b@x.test"],
    )
    assert (counts.accepted, counts.delivered, counts.unexpected) == (1, 1, 0)
    assert counts.unacknowledged == 1
    assert counts.duplicates == 1  # b twice: duplicates count for every send
    assert lag.get_total_count() == 1  # lag only from a 2xx


def test_clock_skew_never_gives_a_negative_lag() -> None:
    _, lag = reconcile([("a@x.test", 5.0)], [entry("a@x.test", 4.9)])
    assert lag.get_total_count() == 1
    assert lag.get_value_at_percentile(100) <= 1  # the histogram's floor, 1 µs
