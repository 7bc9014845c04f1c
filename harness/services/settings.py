"""Where the local brokers live and listen, read once at the entry point."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from harness.errors import ConfigError

SERVICE_NAMES: Final = ("rabbitmq", "redis", "postgres", "sqs")
# The variable naming a broker the user runs: with it set, mailbench starts none.
ENV_VARS: Final[Mapping[str, str]] = {
    "rabbitmq": "AMQP_URL",
    "redis": "REDIS_URL",
    "postgres": "DATABASE_URL",
    "sqs": "SQS_URL",  # sqs://HOST:PORT, or an AWS queue's https:// URL
}


# Redis's appendfsync for the Redis mailbench starts. "always": Redis writes and fsyncs
# the AOF before it replies, so an accepted job survives a host crash. "everysec": a
# background fsync once a second; a reply usually follows the write to the page cache,
# but while a background fsync is still running Redis postpones the write for up to 2 s
# and replies meanwhile, so a crash (of the host, or then even of Redis) can take the
# last ~2 s of accepted jobs.
REDIS_FSYNC: Final = ("always", "everysec")


def services_home() -> Path:
    """Where ``mailbench services`` keeps the brokers it leaves running, their data and
    ``state.json``, in the folder it is run from (docs: README, docs/target.md)."""
    return Path.cwd() / ".mailbench" / "services"


def _apt_allowed() -> bool:
    debian = Path("/etc/debian_version").exists()
    return os.geteuid() == 0 and debian and shutil.which("apt-get") is not None


@dataclass(frozen=True)
class ServiceSettings:
    """Where the brokers live and listen. Ports are private so a system broker is untouched."""

    base_dir: Path = field(default_factory=services_home)
    # base_dir was made for one run (`mailbench run` or `chaos` without --services-dir):
    # removed, data and all, when the brokers stop, so a run leaves nothing behind in the
    # folder it was started from or in its results (which must hold no credentials).
    temporary: bool = False
    # Where `mailbench services up` records the brokers it left running, for a run to use
    # them; None: base_dir.
    shared_dir: Path | None = None
    # Below Linux's ephemeral range (32768-60999), where any outgoing connection may
    # hold a port for a minute, and clear of the brokers' own defaults.
    rabbitmq_port: int = 28672
    rabbitmq_dist_port: int = 28673  # Erlang distribution, for rabbitmqctl
    epmd_port: int = 28369  # a private epmd, not the machine's 4369
    redis_port: int = 28379
    postgres_port: int = 28432
    sqs_port: int = 28576  # moto's server (its own default is 5000)
    redis_fsync: str = "always"  # one of REDIS_FSYNC
    install: bool = field(default_factory=_apt_allowed)  # may apt-get install a missing broker
    start_timeout: float = 60.0  # RabbitMQ needs ~5 s alone, far more on a busy 2-core box
    stop_timeout: float = 10.0
    # The caller's environment, taken once when the settings are made (at the entry
    # point); nothing here reads os.environ later. Not in the repr: it holds secrets
    # (MAILGUN_API_KEY, URLs with passwords).
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.redis_fsync not in REDIS_FSYNC:
            raise ConfigError(
                f"Redis fsync policy {self.redis_fsync!r} is not one of {', '.join(REDIS_FSYNC)}."
            )

    def url_from_env(self, name: str) -> str | None:
        return self.env.get(ENV_VARS[name]) or None
