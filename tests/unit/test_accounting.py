from harness.accounting import reconcile


def entry(key: str | None, at: float, testmode: bool = False) -> dict[str, object]:
    return {"idempotency_key": key, "accepted_at": at, "testmode": testmode}


def test_every_accepted_delivered_once() -> None:
    counts, lag = reconcile([("a", 10.0), ("b", 11.0)], [entry("a", 10.5), entry("b", 12.0)])
    assert counts.as_row() == {
        "accepted": 2,
        "delivered": 2,
        "duplicates": 0,
        "dead_lettered": 0,
        "lost": 0,
        "unexpected": 0,
    }
    assert lag.get_total_count() == 2
    assert abs(lag.get_value_at_percentile(100) - 1_000_000) < 1_000_000 * 0.001


def test_lost_duplicate_unexpected_and_dead() -> None:
    accepted = [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)]
    ledger = [
        entry("a", 2.0),
        entry("a", 3.0),  # delivered twice
        entry("zzz", 2.0),  # nobody was promised this one
        entry(None, 2.0),  # no key at all
        entry("b", 2.0, testmode=True),  # test mode is not a delivery
    ]
    counts, lag = reconcile(accepted, ledger, dead_lettered=["c", "zzz"])
    assert counts.delivered == 1
    assert counts.duplicates == 1
    assert counts.unexpected == 2
    assert counts.dead_lettered == 1
    assert counts.lost == 2  # b (test mode only) and d
    # delivery lag counts the first delivery only
    assert lag.get_total_count() == 1
    assert abs(lag.get_value_at_percentile(50) - 1_000_000) < 1_000


def test_dead_letter_after_delivery_is_not_double_counted() -> None:
    counts, _ = reconcile([("a", 1.0)], [entry("a", 2.0)], dead_lettered=["a"])
    assert (counts.delivered, counts.dead_lettered, counts.lost) == (1, 0, 0)
