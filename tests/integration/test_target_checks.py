"""A target that is down stops the run at once, with the URL and the error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.process import mailbench_command

pytestmark = pytest.mark.integration


def test_a_dead_target_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        mailbench_command(
            "run", "--target", "http://127.0.0.1:1", "--scenario", "reader", "--duration", "3",
            "--warmup", "0", "--users", "2", "--out", str(out),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "mailbench run: The target's form page http://127.0.0.1:1/ does not answer ("
    ), last
    assert last.endswith("): start the server first, or correct --target or --form-path."), last
    assert not list(out.glob("*/manifest.json"))  # nothing was started, nothing written
