"""Where a run's brokers live: a temporary directory of the run's own, removed after it,
unless ``--services-dir`` names one; ``mailbench services`` keeps ``.mailbench/services``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pytest

from harness.services.manager import Services, add_service_arguments, settings_from_args


def parsed(per_run: bool, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser, dir_flag="--services-dir" if per_run else "--dir",
                          per_run=per_run)  # fmt: skip
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def test_a_run_keeps_its_brokers_in_a_temporary_directory_removed_after_it(in_tmp: Path) -> None:
    settings = settings_from_args(parsed(True))
    assert settings.temporary and settings.base_dir.parent == in_tmp / "tmp"
    assert settings.base_dir.is_dir() and not (in_tmp / ".mailbench").exists()
    # What `mailbench services up` left running is still looked for in its usual place.
    assert settings.shared_dir == in_tmp / ".mailbench" / "services"
    (settings.base_dir / "redis").mkdir()
    (settings.base_dir / "redis" / "appendonly.aof").write_text("a job")
    with Services(settings):
        pass
    assert not settings.base_dir.exists()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["tmp"]


def test_a_broker_that_failed_to_start_keeps_the_directory_for_its_log(in_tmp: Path) -> None:
    settings = settings_from_args(parsed(True))
    services = Services(settings)
    services._failed = True  # as start() records a ServiceUnavailable
    with services:
        pass
    assert settings.base_dir.is_dir()


def test_services_dir_and_the_services_command_keep_their_folders(in_tmp: Path) -> None:
    given = settings_from_args(parsed(True, "--services-dir", "brokers"))
    assert given.base_dir == in_tmp / "brokers" and not given.temporary
    assert given.shared_dir is None
    command = settings_from_args(parsed(False))
    assert command.base_dir == in_tmp / ".mailbench" / "services" and not command.temporary
    command.base_dir.mkdir(parents=True)
    with Services(command):
        pass
    assert command.base_dir.is_dir()  # never removed: `services up` left brokers there
