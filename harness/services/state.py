"""``base_dir/state.json``: what ``mailbench services up`` left running, for ``down`` and ``run``.

Each entry records the broker's URL, its leader process (PID and kernel start time, so a
recycled PID is never signalled), its process group, the stop signal and the tag that
every process of the broker carries in its environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.process import TAG_VAR, Pid, terminate, with_environment

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def read_state(base_dir: Path) -> dict[str, dict[str, Any]]:
    """Entries by service name; empty when there is no (readable) state file."""
    try:
        data = json.loads((base_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", base_dir / STATE_FILE, exc)
        return {}
    services = data.get("services", {}) if isinstance(data, dict) else {}
    return {k: v for k, v in services.items() if isinstance(v, dict)}


def write_state(base_dir: Path, services: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the entries, or remove the file when there are none."""
    path = base_dir / STATE_FILE
    if not services:
        path.unlink(missing_ok=True)
        return
    base_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "services": services}, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def entry_alive(entry: Mapping[str, Any]) -> bool:
    try:
        return Pid.from_json(entry["leader"]).alive()
    except (KeyError, TypeError, ValueError):
        return False


def urls_from_state(base_dir: Path) -> dict[str, str]:
    """URLs of the brokers ``mailbench services up`` started in ``base_dir`` that still run."""
    return {n: str(e["url"]) for n, e in read_state(base_dir).items() if entry_alive(e)}


def stop_entry(entry: Mapping[str, Any], timeout: float) -> list[Pid]:
    """Stop a broker that another process started; return the processes that survived."""
    leader = Pid.from_json(entry["leader"])
    helpers = with_environment({TAG_VAR: str(entry["tag"])})
    return terminate(leader, sig=int(entry["signal"]), helpers=helpers, timeout=timeout)
