"""How the RabbitMQ backend reads a delivery's count from what the broker sends along
(the real broker's counts are tested in tests/integration/test_rabbitmq_loss.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from queues.rabbitmq import _deliveries


def message(headers: dict[str, Any] | None, redelivered: bool) -> Any:
    return SimpleNamespace(headers=headers, redelivered=redelivered)


@pytest.mark.parametrize(
    ("headers", "redelivered", "expected"),
    [
        ({}, False, 1),  # a quorum queue's first delivery carries no count
        ({"x-delivery-count": 1}, True, 2),  # it counts the earlier deliveries
        ({"x-delivery-count": 6}, True, 7),
        (None, False, 1),  # a classic queue: the redelivered flag is all there is
        (None, True, 2),
        ({"x-delivery-count": "3"}, True, 2),  # not a count: the flag decides
        ({"x-delivery-count": -1}, False, 1),
    ],
)
def test_deliveries_from_the_count_header_else_the_redelivered_flag(
    headers: dict[str, Any] | None, redelivered: bool, expected: int
) -> None:
    assert _deliveries(message(headers, redelivered)) == expected
