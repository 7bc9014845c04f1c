"""``base_dir/state.json``: what ``mailbench services up`` left running, for ``down`` and ``run``.

Each entry records the broker's URL, its leader process (PID and kernel start time, so a
recycled PID is never signalled), its process group, the stop signal and the tag that
every process of the broker carries in its environment. The URLs carry the brokers'
passwords, so the file is its owner's alone (0600), and so is ``base_dir/env``, the same
URLs as shell ``export`` lines for the user to source.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.process import TAG_VAR, Pid, terminate, with_environment
from harness.services.settings import ENV_VARS

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
ENV_FILE = "env"  # `. base_dir/env` sets AMQP_URL, REDIS_URL, DATABASE_URL


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
    """Write the entries and the env file, or remove both when there are none."""
    path, env = base_dir / STATE_FILE, base_dir / ENV_FILE
    if not services:
        path.unlink(missing_ok=True)
        env.unlink(missing_ok=True)
        return
    base_dir.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps({"version": 1, "services": services}, indent=2) + "\n")
    exports = [
        f"export {ENV_VARS[name]}={shlex.quote(str(entry['url']))}\n"
        for name, entry in services.items()
        if name in ENV_VARS and "url" in entry
    ]
    write_private(env, "".join(exports))


def write_private(path: Path, text: str) -> None:
    """Write ``path`` atomically (a reader never sees half a file), readable by its owner
    alone from the first byte: it may hold a password."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    tmp.replace(path)


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
