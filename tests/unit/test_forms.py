import pytest
from multidict import MultiDict

from servers.web.forms import (
    MAX_MESSAGE,
    MAX_SUBJECT,
    FormError,
    empty_form,
    render_form,
    validate,
)

VALID = {"to": "ada@example.com", "subject": "Hello", "message": "Hi there"}


def test_valid_form_is_normalised() -> None:
    form = validate({**VALID, "to": "  Ada@Example.COM ", "subject": " Hello "})
    assert form.to == "Ada@example.com"  # the domain is normalised, the local part kept
    assert form.subject == "Hello"
    assert form.message == "Hi there"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"to": ""}, "to", "recipient"),
        ({"to": "not-an-address"}, "to", "not a valid email address"),
        ({"to": "a@b@example.com"}, "to", "not a valid email address"),
        ({"to": "x" * 250 + "@example.com"}, "to", "longer than"),
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject", "single line"),
        ({"subject": "Hi\nthere"}, "subject", "single line"),
        ({"subject": "   "}, "subject", "Enter a subject"),
        ({"subject": "s" * (MAX_SUBJECT + 1)}, "subject", "longer than"),
        ({"message": ""}, "message", "Enter a message"),
        ({"message": "m" * (MAX_MESSAGE + 1)}, "message", "longer than"),
    ],
)
def test_invalid_fields_name_the_field(change: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(FormError) as caught:
        validate({**VALID, **change})
    assert caught.value.field == field
    assert words in caught.value.message


def test_missing_fields_are_errors_not_crashes() -> None:
    with pytest.raises(FormError) as caught:
        validate({})
    assert caught.value.field == "to"


@pytest.mark.parametrize("missing", ["to", "subject", "message"])
def test_a_missing_field_is_named(missing: str) -> None:
    with pytest.raises(FormError) as caught:
        validate({name: value for name, value in VALID.items() if name != missing})
    assert caught.value.field == missing
    assert f"no {missing!r} field" in caught.value.message


@pytest.mark.parametrize("name", ["to", "subject", "message"])
def test_a_field_sent_twice_is_ambiguous(name: str) -> None:
    data = MultiDict(VALID)
    data.add(name, VALID[name])
    with pytest.raises(FormError) as caught:
        validate(data)
    assert caught.value.field == name
    assert "more than once" in caught.value.message


def test_other_fields_sent_twice_are_ignored() -> None:
    data = MultiDict(VALID)
    data.add("submit", "Send")
    data.add("submit", "Send")
    assert validate(data).to == VALID["to"]


LINE_BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c"]


@pytest.mark.parametrize("field", ["to", "subject"])
@pytest.mark.parametrize("where", ["middle", "end"])
@pytest.mark.parametrize("line_break", LINE_BREAKS)
def test_a_line_break_in_a_header_field_is_refused(field: str, where: str, line_break: str) -> None:
    injected = "Bcc: victim@example.com" if where == "middle" else ""
    # At the end too: a trailing newline must be refused, not stripped and forgotten.
    value = f"{VALID[field]}{line_break}{injected}"
    with pytest.raises(FormError) as caught:
        validate({**VALID, field: value})
    assert caught.value.field == field
    assert "single line" in caught.value.message


@pytest.mark.parametrize("field", ["to", "subject"])
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x9b", "\t"])
def test_control_characters_in_a_header_field_are_refused(field: str, char: str) -> None:
    with pytest.raises(FormError) as caught:
        validate({**VALID, field: f"{VALID[field][:3]}{char}{VALID[field][3:]}"})
    assert caught.value.field == field
    assert f"U+{ord(char):04X}" in caught.value.message


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x7f"])
def test_control_characters_in_the_message_are_refused(char: str) -> None:
    with pytest.raises(FormError) as caught:
        validate({**VALID, "message": f"Hi{char}there"})
    assert caught.value.field == "message"
    assert "control character" in caught.value.message


def test_line_breaks_and_tabs_in_the_message_are_text() -> None:
    text = "Dear Ada,\r\n\r\n\tthank you.\nBcc: not a header here\u2028end"
    assert validate({**VALID, "message": text}).message == text


def test_unicode_text_is_kept() -> None:
    form = validate({**VALID, "subject": "Grüße — 你好 🙂", "message": "ça va ?"})
    assert (form.subject, form.message) == ("Grüße — 你好 🙂", "ça va ?")


def test_file_instead_of_text_is_refused() -> None:
    with pytest.raises(FormError, match="must be text"):
        validate({**VALID, "message": object()})


def test_form_page_is_a_real_form_with_the_token() -> None:
    page = empty_form("123.abc-_").decode()
    for name in ("to", "subject", "message"):
        assert f'name="{name}"' in page
    assert 'method="post" action="/send"' in page
    assert '<input type="hidden" name="csrf_token" value="123.abc-_">' in page
    assert page == render_form(csrf_token="123.abc-_")


def test_rerendered_form_keeps_the_token_escaped() -> None:
    page = render_form(VALID, csrf_token='x"><script>')
    assert 'value="x&quot;&gt;&lt;script&gt;"' in page


def test_rerendered_form_escapes_values_and_shows_error() -> None:
    page = render_form(
        {"to": '"><script>x</script>', "subject": 'a" onfocus="alert(1)', "message": "</textarea>"},
        error="Bad <address>",
    )
    assert "<script>" not in page
    assert "&quot;&gt;&lt;script&gt;" in page
    assert 'value="a&quot; onfocus=&quot;alert(1)"' in page
    assert "&lt;/textarea&gt;</textarea>" in page
    assert "Bad &lt;address&gt;" in page
