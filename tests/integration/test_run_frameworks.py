"""End to end per framework mode: a short real run through the framework's own worker in
which no accepted email is lost, with the worker's figures and its pool in the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ProcessFailed
from harness.process import venv_python
from harness.results.folder import load_run
from servers.modes import FRAMEWORKS, MODES

pytestmark = pytest.mark.integration

FRAMEWORK_MODES = FRAMEWORKS  # both configurations of every framework


def _missing_venv(mode: str) -> str | None:
    """Why the mode's own venv (arq's: .venv-arq, which `make install` makes) is not
    there, or None."""
    venv = MODES[mode].python
    try:
        venv_python(venv)
    except ProcessFailed as exc:
        return str(exc)
    return None


RUN_MODES = tuple(m for m in FRAMEWORK_MODES if _missing_venv(m) is None)


@pytest.fixture(scope="module")
def framework_run(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, redis_url: str, postgres_url: str
) -> Path:
    out = tmp_path_factory.mktemp("results")
    env = {**os.environ, "AMQP_URL": rabbitmq_url, "REDIS_URL": redis_url, "CI": "true"}
    env["DATABASE_URL"] = postgres_url
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--modes", ",".join(RUN_MODES),
         "--duration", "5", "--warmup", "1", "--users", "20", "--latency", "fixed:0.05",
         "--out", str(out)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "latest"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("mode", FRAMEWORK_MODES)
def test_nothing_lost_and_the_worker_reports(framework_run: Path, mode: str) -> None:
    missing = _missing_venv(mode)
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)  # CI's `make test` makes it
        pytest.skip(missing)
    run = load_run(framework_run)
    row = run.accounting_of(mode)
    assert row is not None and row.accepted > 0
    assert row.lost == 0 and row.unexpected == 0 and row.dead_lettered == 0, row
    assert row.delivered == row.accepted
    for metric in ("send", "api", "delivery", "queue_wait"):
        summary = run.row(mode, metric)
        assert summary is not None and summary.count > 0, metric
    described = json.loads((framework_run / "manifest.json").read_text())["modes"][mode]
    framework = described["framework"]
    assert framework["name"] == mode.split("-")[0]
    assert framework["config"] == ("reliable" if mode.endswith("-reliable") else "default")
    assert framework["pool"]
