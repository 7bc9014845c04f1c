"""Reading and checking a send as Mailgun does, with Mailgun's own 400 messages.

This runs for every send the fake answers, up to thousands a second, so the common case
(a urlencoded body, plain addresses) avoids the costly general tools: ``request.post()``'s
MultiDict and the standard address parser are kept for the bodies and addresses that
need them.
"""

from __future__ import annotations

import os
import re
from email.utils import getaddresses

from aiohttp import web
from yarl import query_to_pairs

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_RECIPIENTS = 1000
MAX_VARIABLES_BYTES = 16 * 1024
_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+")
_ANGLE = re.compile(r"<([^<>]*)>\s*$")
_VARIABLE_PREFIXES = frozenset({"o:", "h:", "v:", "t:"})
_NONE: list[str] = []  # a shared default for absent fields; never mutated
Fields = dict[str, list[str]]


class BadRequest(Exception):
    """A send Mailgun would refuse with 400 and this message."""


def first(fields: Fields, name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None


async def read_fields(request: web.BaseRequest) -> tuple[Fields, int]:
    """The text fields of a send, and its size with attachments."""
    fields: Fields = {}
    # The raw header, not request.content_type, which parses it on every request.
    content_type = request.headers.get("Content-Type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        # Not request.post(): on this hot path its MultiDict is the costly part.
        body = await request.read()
        for key, value in query_to_pairs(body.decode("utf-8", "replace")):
            fields.setdefault(key, []).append(value)
        return fields, len(body)
    size = 0
    for key, item in (await request.post()).items():
        if isinstance(item, web.FileField):  # an attachment or inline: only its size matters
            size += item.file.seek(0, os.SEEK_END)
            item.file.close()
            continue
        text = item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")
        size += len(text)
        fields.setdefault(key, []).append(text)
    return fields, size


def _addresses(field: str, values: list[str]) -> list[str]:
    found: list[str] = []
    for value in values:
        if '"' in value:
            # A quoted display name may hide commas: the standard parser handles it,
            # at ~30 µs a call too slow to be the common path.
            parts = [address for _, address in getaddresses([value])]
        else:
            parts = value.split(",")
        for part in parts:
            address = part.strip()
            if "<" in address:  # Name <user@domain>
                match = _ANGLE.search(address)
                address = match.group(1).strip() if match else ""
            if not address:
                continue
            if _ADDRESS.fullmatch(address) is None:
                raise BadRequest(
                    f"'{field}' parameter is not a valid address. please check documentation"
                )
            found.append(address)
    return found


def validate(fields: Fields, size: int) -> list[str]:
    """Check a send of ``size`` bytes as Mailgun does; return all recipients (to, cc, bcc).

    Raises :class:`BadRequest` with the message Mailgun would answer 400 with.
    """
    if size > MAX_MESSAGE_BYTES:
        raise BadRequest("Message size exceeds the 25MB limit")
    get = fields.get
    if not _addresses("from", get("from", _NONE)):
        raise BadRequest("'from' parameter is missing")
    recipients = _addresses("to", get("to", _NONE))
    if not recipients:
        raise BadRequest("'to' parameter is missing")
    if "cc" in fields or "bcc" in fields:
        recipients += _addresses("cc", get("cc", _NONE)) + _addresses("bcc", get("bcc", _NONE))
    if len(recipients) > MAX_RECIPIENTS:
        raise BadRequest(f"Too many recipients: {len(recipients)}, the maximum is {MAX_RECIPIENTS}")
    if not (any(get("text", _NONE)) or any(get("html", _NONE)) or any(get("template", _NONE))):
        raise BadRequest("Need at least one of 'text', 'html' or 'template' parameters specified")
    variables = 0
    for key, values in fields.items():
        if key[:2] in _VARIABLE_PREFIXES:
            variables += len(key) + sum(map(len, values))
    if variables > MAX_VARIABLES_BYTES:
        raise BadRequest("Total size of 'o:', 'h:', 'v:' and 't:' parameters exceeds 16KB")
    return recipients
