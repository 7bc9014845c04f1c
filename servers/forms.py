"""The email form: its HTML, and validation of what comes back from it."""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

MAX_ADDRESS = 254  # RFC 5321 path limit
MAX_SUBJECT = 200
MAX_MESSAGE = 10_000
MAX_BODY_BYTES = 64 * 1024  # the whole POST; anything bigger is refused before parsing


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
    to = _text(data, "to").strip()
    subject = _text(data, "subject")
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
    if "\r" in subject or "\n" in subject:
        # A line break in a header is the classic header-injection vector.
        raise FormError("subject", "The subject must be a single line.")
    if not subject.strip():
        raise FormError("subject", "Enter a subject.")
    if len(subject) > MAX_SUBJECT:
        raise FormError("subject", f"The subject is longer than {MAX_SUBJECT} characters.")
    if not message.strip():
        raise FormError("message", "Enter a message.")
    if len(message) > MAX_MESSAGE:
        raise FormError("message", f"The message is longer than {MAX_MESSAGE} characters.")
    return EmailForm(to=to, subject=subject.strip(), message=message)


def _text(data: Mapping[str, object], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise FormError(name, f"The field {name!r} must be text, not a file.")
    return value


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
<label for="to">To</label>
<input id="to" name="to" type="email" required maxlength="{max_address}" value="{to}">
<label for="subject">Subject</label>
<input id="subject" name="subject" required maxlength="{max_subject}" value="{subject}">
<label for="message">Message</label>
<textarea id="message" name="message" rows="6" required
 maxlength="{max_message}">{message}</textarea>
<p><button type="submit">Send</button></p>
</form>"""


def render_form(values: Mapping[str, object] | None = None, error: str | None = None) -> str:
    values = values or {}

    def field(name: str) -> str:
        value = values.get(name, "")
        return html.escape(value if isinstance(value, str) else "")

    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>\n' if error else ""
    body = _FORM.format(
        error=error_html,
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


FORM_PAGE = render_form()  # identical in every mode, rendered once
