"""The Locust side's files: each process's journal of chunks, merged by one reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ResultsError
from harness.results.accounting import reconcile
from harness.results.collect import client_sends, read_locust
from scenarios.record import LoadRecord
from servers.metrics import decode

T0 = 1_000_000.0  # a wall-clock time


def sends(record: LoadRecord, recipients: list[str], at: float) -> None:
    for recipient in recipients:
        record.sends_started.append(recipient)
        record.record("send", 5_000, at, at + 0.005)
        record.sends_ok.append((recipient, at))


def journal(folder: Path, pid: int, chunks: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"locust-hdr-{pid}.jsonl").open("a") as f:
        f.writelines(json.dumps(chunk) + "\n" for chunk in chunks)


def ledger_of(recipients: list[str]) -> list[dict[str, Any]]:
    return [{"recipients": [r], "accepted_at": T0 + 1} for r in recipients]


@pytest.fixture
def phase(tmp_path: Path) -> Path:
    """A master and two workers: the master's journal holds the first chunk of each
    worker (shipped), the workers' own journals hold all of theirs; worker b's last chunk
    never reached the master."""
    a, b = LoadRecord("host-1-a"), LoadRecord("host-1-b")
    sends(a, ["a1@x.test", "a2@x.test"], T0)
    a_first = a.chunk()
    sends(a, ["a3@x.test"], T0 + 2)
    a_last = a.chunk(final=True)
    sends(b, ["b1@x.test"], T0 + 1)  # b starts a second later
    b_first = b.chunk()
    sends(b, ["b2@x.test", "b3@x.test"], T0 + 3)
    b_last = b.chunk(final=True)
    journal(tmp_path, 10, [a_first, a_last, b_first])  # the master's: b's final is missing
    journal(tmp_path, 11, [a_first, a_last])
    journal(tmp_path, 12, [b_first, b_last])
    (tmp_path / "locust-hdr.json").write_text(json.dumps({"started_at": T0, "stopped_at": T0 + 9}))
    return tmp_path


def test_every_chunk_counts_once(phase: Path) -> None:
    merged = read_locust(phase)
    assert merged["processes"] == 2
    assert decode(merged["histograms"]["send"]).get_total_count() == 6
    assert sorted(r for r, _ in merged["sends_ok"]) == [
        "a1@x.test", "a2@x.test", "a3@x.test", "b1@x.test", "b2@x.test", "b3@x.test",
    ]  # fmt: skip
    assert len(merged["sends_started"]) == 6
    assert (merged["started_at"], merged["stopped_at"]) == (T0, T0 + 9)
    # Per second since the earliest first request, both processes' requests together.
    per_second = {s: decode(h["send"]).get_total_count() for s, h in merged["seconds"].items()}
    assert per_second == {"0": 2, "1": 1, "2": 1, "3": 2}
    assert merged["first_request_at"] == T0


def test_a_send_missing_from_the_merge_is_reported_unexpected(phase: Path) -> None:
    ledger = ledger_of(["a1@x.test", "a2@x.test", "a3@x.test", "b1@x.test", "b2@x.test",
                        "b3@x.test"])  # fmt: skip
    accepted, attempted = client_sends(phase)
    counts, _ = reconcile(accepted, ledger, failed=attempted)
    assert (counts.accepted, counts.lost, counts.unexpected) == (6, 0, 0)
    # The negative control: without worker b's own journal its last sends are known to
    # nobody, and the accounting says so.
    (phase / "locust-hdr-12.jsonl").unlink()
    accepted, attempted = client_sends(phase)
    counts, _ = reconcile(accepted, ledger, failed=attempted)
    assert (counts.accepted, counts.unexpected) == (4, 2)


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path: Path) -> None:
    record = LoadRecord("host-2-c")
    sends(record, ["c1@x.test"], T0)
    journal(tmp_path, 20, [record.chunk()])
    with (tmp_path / "locust-hdr-20.jsonl").open("a") as f:
        f.write('{"id": "host-2-c/1", "sends_ok": [["c2@x.te')
    merged = read_locust(tmp_path)
    assert [r for r, _ in merged["sends_ok"]] == ["c1@x.test"]


def test_a_folder_without_locust_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no Locust results"):
        read_locust(tmp_path)


def test_sweep_steps_are_phases_of_their_own(phase: Path) -> None:
    step = LoadRecord("host-1-s")
    sends(step, ["s1@x.test"], T0 + 20)
    journal(phase / "sweep" / "step-00", 30, [step.chunk()])
    assert "s1@x.test" not in {r for r, _ in read_locust(phase)["sends_ok"]}
    assert "s1@x.test" in {r for r, _ in client_sends(phase)[0]}
