"""The text of a calibration: its table and, target by target, what it says."""

from __future__ import annotations

from collections.abc import Sequence

from harness.results.calibration import FLOOR_CASE, PERCENTILES, STALL, STALL_S, Measurement

ABOVE_FLOOR_LIMIT_US = 50  # the target, at p50 and p99
STALL_TOLERANCE = 0.05  # the target: open model from intended start, p99.9


def _us(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f} ms"
    if abs(value) >= 1000:
        return f"{value / 1000:,.2f} ms"
    return f"{value:,.0f} µs"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "−") + _us(abs(value))


def floors(rows: Sequence[Measurement]) -> dict[str, Measurement]:
    """Per model, the 0 ms case: the generator's floor."""
    return {r.model: r for r in rows if r.case == FLOOR_CASE}


def table(rows: Sequence[Measurement]) -> str:
    floor = floors(rows)
    lines = [
        "| case | model | samples | p50 | p99 | p99.9 | error p50 | error p99 | error p99.9 "
        "| above floor p50 | above floor p99 | server's own overshoot p50 / p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = floor.get(r.model)
        above = ["–", "–"]
        if base is not None and r.case not in (FLOOR_CASE, STALL):
            above = [_signed(r.error_us(p) - base.error_us(p)) for p in (50.0, 99.0)]
        cells = [
            r.case if r.case != STALL else f"stall ({r.stalls} × {STALL_S:g} s)",
            r.model,
            f"{r.samples:,}" + (f" ({r.errors:,} failed)" if r.errors else ""),
            *(_us(r.measured_us[p]) for p in PERCENTILES),
            *(_signed(r.error_us(p)) for p in PERCENTILES),
            *above,
            " / ".join(_signed(r.held_us[p] - r.truth_us[p]) for p in (50.0, 99.0))
            if r.case != STALL
            else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: Sequence[Measurement]) -> list[str]:
    """The targets, each said plainly, met or not."""
    said: list[str] = []
    floor = floors(rows)
    for model, zero in floor.items():
        said.append(
            f"floor ({model}): the generator adds {_us(zero.error_us(50.0))} at p50, "
            f"{_us(zero.error_us(99.0))} at p99, {_us(zero.error_us(99.9))} at p99.9"
        )
    for r in rows:
        base = floor.get(r.model)
        if r.case in (FLOOR_CASE, STALL) or base is None or r.model == "open, service time":
            continue
        above = {p: r.error_us(p) - base.error_us(p) for p in (50.0, 99.0)}
        met = all(abs(v) <= ABOVE_FLOOR_LIMIT_US for v in above.values())
        said.append(
            f"{r.case}, {r.model}: error above the floor {_signed(above[50.0])} at p50, "
            f"{_signed(above[99.0])} at p99 — target ≤ {ABOVE_FLOOR_LIMIT_US} µs "
            + ("met" if met else "NOT met")
        )
    for r in rows:
        if r.case != STALL:
            continue
        truth = r.truth_us[99.9]
        if not truth:
            said.append(f"stall, {r.model}: no stall fell in the measured window (too short)")
            continue
        off = r.measured_us[99.9] / truth - 1
        if r.model == "open":
            met = abs(off) <= STALL_TOLERANCE
            said.append(
                f"stall, open model from intended start: p99.9 {_us(r.measured_us[99.9])} against "
                f"a truth of {_us(truth)} ({off:+.1%}) — target within "
                f"{STALL_TOLERANCE:.0%} " + ("met" if met else "NOT met")
            )
        else:
            said.append(
                f"stall, {r.model}: "
                + "; ".join(
                    f"p{p:g} {_us(r.measured_us[p])} against a truth of {_us(r.truth_us[p])} "
                    f"({r.measured_us[p] / r.truth_us[p] - 1:+.0%})"
                    for p in (99.0, 99.9)
                    if r.truth_us[p]
                )
            )
        if r.true_slow_share:
            ratio = r.slow_share / r.true_slow_share
            said.append(
                f"stall, {r.model}: {r.slow_share:.2%} of the requests measured waited more "
                f"than half the stall ({_us(STALL_S / 2 * 1e6)}); in truth {r.true_slow_share:.2%} "
                f"of arrivals do ({ratio:.2f}× the truth)"
            )
    return said
