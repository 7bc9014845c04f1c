"""Reading a POSTed form body: whatever the client sends, a form or a clear 4xx.

aiohttp's own form parsing is lenient where a mail form must not be: it decodes
percent-escapes that are not UTF-8 into U+FFFD replacement characters (so a subject
would silently change), and its multipart reader reports malformed input with half a
dozen exception types, which would otherwise reach the client as a 500.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDictProxy

from servers.web.forms import MAX_BODY_BYTES

log = logging.getLogger(__name__)

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
FORM_CONTENT_TYPES = (URLENCODED, MULTIPART)
MAX_FIELDS = 100  # the form has four; browsers may add a few (the submit button)
_UTF8 = ("utf-8", "utf8")

Form = MultiDictProxy[Any]  # str values, bytes or FileField where a client sent those


class BodyError(Exception):
    """The body is not a readable form; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(request: web.Request) -> Form:
    """The form in ``request``'s body, or :class:`BodyError` saying why there is none."""
    content_type = request.content_type
    if content_type not in FORM_CONTENT_TYPES:
        raise BodyError(
            415,
            f"Send the form as {URLENCODED} or {MULTIPART}, "
            f"not {_shown(content_type) or 'without a content type'}.",
        )
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise BodyError(415, f"Send the form in UTF-8, not {_shown(charset)}.")
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyError(
            413,
            f"The form is larger than {MAX_BODY_BYTES // 1024} KiB "
            f"or has more than {MAX_FIELDS} fields.",
        ) from exc
    except web.HTTPException as exc:
        raise BodyError(exc.status, f"The form could not be read: {exc.reason}.") from exc
    except Exception as exc:
        # Undecodable bytes, a broken or nested multipart, an unknown part encoding, a
        # bogus part charset: the multipart reader raises ValueError, LookupError,
        # RuntimeError, TypeError, zlib.error or an HttpProcessingError for them. All of
        # them mean the client's bytes are not a form; none of them is the server's fault.
        log.info("unreadable form body: %r", exc)
        raise BodyError(400, f"The form could not be read ({_reason(exc)}).") from exc
    if content_type == URLENCODED and any(
        isinstance(value, str) and "\ufffd" in value for value in form.values()
    ):
        await _check_percent_escapes(request)
    return form


async def _check_percent_escapes(request: web.Request) -> None:
    """Refuse percent-escaped bytes that are not UTF-8, which aiohttp decoded into U+FFFD.

    Only called when a value has a U+FFFD: the strict re-parse costs 20 µs, and a real
    replacement character, sent as such, is rare.
    """
    body = (await request.read()).decode("utf-8")  # decoded once already by post()
    try:
        parse_qsl(body, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise BodyError(400, "The form has percent-escaped bytes that are not UTF-8.") from exc


def _shown(text: str) -> str:
    """A client-supplied name, cut short for an error message."""
    return repr(text[:60]) if len(text) > 60 else repr(text)


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not valid UTF-8"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
