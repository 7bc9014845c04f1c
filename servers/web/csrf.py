"""CSRF protection for the email form: a signed double-submit token.

``GET /`` gives the browser a random cookie (``HttpOnly``, ``SameSite=Strict``) and puts a
token in the form that only this server could have made *for that cookie*: an HMAC, keyed
with the server's secret, over the cookie value and a timestamp (itsdangerous'
:class:`~itsdangerous.TimestampSigner`). ``POST /send`` is taken only when the form's
token verifies against the cookie that came with it and is younger than
:data:`MAX_AGE_S`. Another site can make a browser post the form, but it can neither
read the cookie nor sign a token for it.

The token carries the timestamp and the signature but not the cookie value itself: the
signer signs ``cookie.timestamp`` and the cookie part is dropped from what the page
shows, then put back from the request's cookie when the token is checked. So the page
never reveals the ``HttpOnly`` cookie, and a token is useless with any other cookie.

Several server processes behind one port must share the secret (``MAILBENCH_SECRET``);
without it each process draws its own, and a form loaded from one process would be
refused by another.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

COOKIE = "mailbench_csrf"
FIELD = "csrf_token"
SECRET_ENV = "MAILBENCH_SECRET"
MAX_AGE_S = 4 * 3600  # a form left open over lunch still sends
# Signing costs ~8 µs, several times the rest of GET /; a visitor who reloads the form
# within a minute gets the same token again (it then lives up to a minute less).
REUSE_S = 60.0
_REUSE_MAX = 10_000  # cookies remembered; the memory is dropped as a whole when full
_SALT = "mailbench-csrf"
# The header, not aiohttp's request.cookies: SimpleCookie parses every cookie the
# browser sends, and GET / is the benchmark's cheapest request.
_COOKIE_IN_HEADER = re.compile(r"(?:^|[;,]\s*)" + COOKIE + r"=([A-Za-z0-9_-]{16,128})(?:$|[;,\s])")
SET_COOKIE_ATTRIBUTES = "HttpOnly; Path=/; SameSite=Strict"


class CsrfError(Exception):
    """The POST did not come from a form this server handed out; shown to the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Csrf:
    """Makes and checks the form's tokens with one secret."""

    def __init__(self, secret: str | bytes, max_age_s: int = MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self._signer = TimestampSigner(secret, salt=_SALT)
        self._recent: dict[str, tuple[float, str]] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Csrf:
        """The shared secret from ``MAILBENCH_SECRET``, else a random one for this process."""
        return cls(environ.get(SECRET_ENV) or secrets.token_bytes(32))

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def cookie_in(cookie_header: str) -> str | None:
        """The CSRF cookie in a ``Cookie`` header, if there is a well-formed one."""
        if COOKIE not in cookie_header:
            return None
        found = _COOKIE_IN_HEADER.search(cookie_header)
        return found.group(1) if found else None

    @staticmethod
    def set_cookie_header(cookie: str) -> str:
        return f"{COOKIE}={cookie}; {SET_COOKIE_ATTRIBUTES}"

    def token(self, cookie: str) -> str:
        """The token the form carries for ``cookie``: ``timestamp.signature``."""
        now = time.monotonic()
        recent = self._recent.get(cookie)
        if recent is not None and now - recent[0] < REUSE_S:
            return recent[1]
        token = self._signer.sign(cookie).decode("ascii")[len(cookie) + 1 :]
        if len(self._recent) >= _REUSE_MAX:
            self._recent.clear()
        self._recent[cookie] = (now, token)
        return token

    def check(self, cookie: str | None, token: str | None) -> None:
        """Raise :class:`CsrfError` unless ``token`` was made by :meth:`token` for
        ``cookie`` less than :attr:`max_age_s` ago."""
        if cookie is None:
            raise CsrfError(
                "The form's security cookie is missing: load the form again, with cookies "
                "enabled for this site, and send it from there."
            )
        if not token:
            raise CsrfError(
                "The form has no security token: send it from the page at /, not from another site."
            )
        try:
            self._signer.unsign(f"{cookie}.{token}", max_age=self.max_age_s)
        except SignatureExpired as exc:
            hours = self.max_age_s / 3600
            raise CsrfError(
                f"The form is older than {hours:g} hours: load it again and resend."
            ) from exc
        except BadSignature as exc:
            raise CsrfError(
                "The form's security token does not match this browser's cookie: load the "
                "form again and resend."
            ) from exc
