"""The email form: its HTML, and validation of what comes back from it.

Two of the fields become mail headers (``to`` and ``subject``): a line break there is the
classic header-injection vector (``Hi\\r\\nBcc: victims``), so every line break — CR, LF,
and the Unicode separators that line-splitting code also honours — and every other
control character is refused, not stripped: a form that carries one was not typed by a
person, and silently "fixing" it would hide the attempt. The message body is text where
line breaks belong; only the other control characters are refused there.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email
from multidict import MultiMapping

MAX_ADDRESS = 254  # RFC 5321 path limit
MAX_SUBJECT = 200
MAX_MESSAGE = 10_000
MAX_BODY_BYTES = 64 * 1024  # the whole POST; anything bigger is refused before parsing

FIELDS = ("to", "subject", "message")
_LABELS = {"to": "address", "subject": "subject", "message": "message"}
# What some piece of code on the way to the inbox treats as the end of a line: CR and LF
# (SMTP, the email package), VT, FF, FS/GS/RS, NEL and U+2028/U+2029 (str.splitlines()
# and Unicode-aware parsers).
_LINE_BREAK = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Any other control character, NUL included, has no business in a header.
_HEADER_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# In the body, tab, LF and CR are text (browsers send a textarea's line breaks as CRLF).
# NUL and the other C0 controls are not: SMTP forbids NUL outright (RFC 5321 4.1.1.4),
# C-string code truncates at it, and escape sequences (ESC, BS) are how a message or a
# log line viewed in a terminal gets rewritten.
_BODY_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class FormError(ValueError):
    """A field of the form is invalid; the message is shown to the user beside the form."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class EmailForm:
    to: str
    subject: str
    message: str


def validate(data: Mapping[str, object]) -> EmailForm:
    """The form's three fields, checked and normalised, or :class:`FormError` naming the
    first field that is wrong. Fields other than the three are ignored."""
    to = _header(data, "to").strip()
    subject = _header(data, "subject")
    message = _text(data, "message")
    if not to:
        raise FormError("to", "Enter the recipient's email address.")
    if len(to) > MAX_ADDRESS:
        raise FormError("to", f"The address is longer than {MAX_ADDRESS} characters.")
    try:
        # No DNS look-up: the benchmark must not depend on the network, and the API
        # decides deliverability anyway.
        to = validate_email(to, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise FormError("to", f"{to!r} is not a valid email address: {exc}") from exc
    if not subject.strip():
        raise FormError("subject", "Enter a subject.")
    if len(subject) > MAX_SUBJECT:
        raise FormError("subject", f"The subject is longer than {MAX_SUBJECT} characters.")
    if not message.strip():
        raise FormError("message", "Enter a message.")
    if len(message) > MAX_MESSAGE:
        raise FormError("message", f"The message is longer than {MAX_MESSAGE} characters.")
    found = _BODY_CONTROL.search(message)
    if found:
        raise FormError(
            "message",
            f"The message contains a control character ({_codepoint(found.group())}); "
            "only text, tabs and line breaks are allowed.",
        )
    return EmailForm(to=to, subject=subject.strip(), message=message)


def _header(data: Mapping[str, object], name: str) -> str:
    """A field that becomes a mail header: one line, no control characters."""
    value = _text(data, name)
    label = _LABELS[name]
    if _LINE_BREAK.search(value):
        raise FormError(name, f"The {label} must be a single line.")
    found = _HEADER_CONTROL.search(value)
    if found:
        raise FormError(
            name, f"The {label} contains a control character ({_codepoint(found.group())})."
        )
    return value


def _text(data: Mapping[str, object], name: str) -> str:
    if name not in data:
        raise FormError(name, f"The form has no {name!r} field.")
    if isinstance(data, MultiMapping) and len(data.getall(name)) > 1:
        # Which copy would a mail library, a proxy or a log use? Ambiguous input is
        # refused rather than guessed at.
        raise FormError(name, f"The field {name!r} was sent more than once.")
    value = data[name]
    if not isinstance(value, str):
        raise FormError(name, f"The field {name!r} must be text, not a file.")
    return value


def _codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"


_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem}}
label{{display:block;margin-top:1rem}}input,textarea{{width:100%;font:inherit}}
.error{{color:#b00020}}</style></head>
<body>
{body}
</body>
</html>
"""

_FORM = """<h1>Send an email</h1>
{error}<form method="post" action="/send">
<input type="hidden" name="csrf_token" value="{csrf_token}">
<label for="to">To</label>
<input id="to" name="to" type="email" required maxlength="{max_address}" value="{to}">
<label for="subject">Subject</label>
<input id="subject" name="subject" required maxlength="{max_subject}" value="{subject}">
<label for="message">Message</label>
<textarea id="message" name="message" rows="6" required
 maxlength="{max_message}">{message}</textarea>
<p><button type="submit">Send</button></p>
</form>"""


def render_form(
    values: Mapping[str, object] | None = None,
    error: str | None = None,
    csrf_token: str = "",
) -> str:
    """The form, filled in with ``values`` (escaped) and with ``error`` above it."""
    values = values or {}

    def field(name: str) -> str:
        value = values.get(name, "")
        return html.escape(value if isinstance(value, str) else "")

    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>\n' if error else ""
    body = _FORM.format(
        error=error_html,
        csrf_token=html.escape(csrf_token),
        to=field("to"),
        subject=field("subject"),
        message=field("message"),
        max_address=MAX_ADDRESS,
        max_subject=MAX_SUBJECT,
        max_message=MAX_MESSAGE,
    )
    return _PAGE.format(title="Send an email", body=body)


def render_done(title: str, text: str) -> str:
    body = (
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(text)}</p>\n"
        '<p><a href="/">Send another</a></p>'
    )
    return _PAGE.format(title=html.escape(title), body=body)


# The page GET / serves is identical in every mode but for the visitor's CSRF token:
# rendered once, in two halves around it.
_TOKEN_SLOT = "\x00csrf_token\x00"
_FORM_HEAD, _FORM_TAIL = render_form(csrf_token=_TOKEN_SLOT).encode().split(_TOKEN_SLOT.encode())


def empty_form(csrf_token: str) -> bytes:
    """The empty form as UTF-8, carrying ``csrf_token``.

    The token is inserted unescaped: only tokens from :mod:`servers.web.csrf` (URL-safe
    base64 and dots) may be passed here; :func:`render_form` is for anything else.
    """
    return _FORM_HEAD + csrf_token.encode("ascii") + _FORM_TAIL
