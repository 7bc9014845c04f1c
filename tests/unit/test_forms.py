import pytest

from servers.forms import FORM_PAGE, MAX_MESSAGE, MAX_SUBJECT, FormError, render_form, validate

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


def test_file_instead_of_text_is_refused() -> None:
    with pytest.raises(FormError, match="must be text"):
        validate({**VALID, "message": object()})


def test_form_page_is_a_real_form() -> None:
    for name in ("to", "subject", "message"):
        assert f'name="{name}"' in FORM_PAGE
    assert 'method="post" action="/send"' in FORM_PAGE


def test_rerendered_form_escapes_values_and_shows_error() -> None:
    page = render_form({"to": '"><script>x</script>', "subject": "s"}, error="Bad <address>")
    assert "<script>" not in page
    assert "&quot;&gt;&lt;script&gt;" in page
    assert "Bad &lt;address&gt;" in page
