"""Reading queue URLs: mailbench's settings in the query string, and the URL fit to show.

Both work on the text of the URL rather than rebuilding it with ``urlunsplit``, which
turns ``sqlite:////abs/path.db`` into ``sqlite://abs/path.db`` and
``postgresql:///db?host=/run/postgresql`` into ``postgresql:/db?...``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from queues.errors import ConfigError


class _Dataclass(Protocol):
    __dataclass_fields__: ClassVar[dict[str, Any]]


D = TypeVar("D", bound=_Dataclass)

HIDDEN = "***"


def split_settings(url: str, defaults: D, label: str | None = None) -> tuple[str, D]:
    """Split the fields of the dataclass ``defaults`` off the query of ``url``, each read
    with the type of its default and required to be positive; the other parameters stay
    in the URL returned, for the driver. ``label`` names the URL in errors ("the Redis
    URL"; the scheme when not given)."""
    parts = urlsplit(url)
    label = label or parts.scheme
    kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(defaults)}
    ours: dict[str, Any] = {}
    theirs = []
    for key, value in parse_qsl(parts.query):
        if key not in kinds:
            theirs.append((key, value))
            continue
        try:
            ours[key] = kinds[key](value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} in the {label} URL is not a number") from None
        if ours[key] <= 0:
            raise ConfigError(f"{key} in the {label} URL must be positive, not {value}")
    query = urlencode(theirs)
    rest = _before_query(url) + (f"?{query}" if query else "")
    return rest + (f"#{parts.fragment}" if parts.fragment else ""), replace(defaults, **ours)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (in the user info, and the value of a
    ``password`` query parameter as libpq and redis-py accept), everything else as given:
    fit for logs, stdout and error messages. A URL without a password comes back as is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The authority ends at the first "/", "?" or "#" (RFC 3986, and what urlsplit and
    # the drivers read); its user info ends at the last "@" in it.
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, _, host = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if password:
        netloc = f"{user}:{HIDDEN}@{host}"
    path, question, query_and_fragment = tail.partition("?")
    query, hash_, fragment = query_and_fragment.partition("#")
    if question and "#" not in path:
        tail = f"{path}?{_redact_query(query)}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def _redact_query(query: str) -> str:
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if equals and value and unquote(key).lower().endswith("password"):
            pair = f"{key}={HIDDEN}"
        pairs.append(pair)
    return "&".join(pairs)


def _before_query(url: str) -> str:
    """``url`` up to its query or fragment, as given."""
    end = min((i for i in map(url.find, "?#") if i >= 0), default=len(url))
    return url[:end]
