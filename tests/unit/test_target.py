"""``--target``: a server that does not answer its form page is one sentence before any
load, and the fake's port option takes 0 (any free port)."""

from __future__ import annotations

import httpx
import pytest
import respx

from harness.errors import ConfigError
from harness.run.target import FREE_PORT, Target

FORM = "<html><form method=post action=/send></form></html>"


def test_a_form_page_that_answers_passes() -> None:
    with respx.mock(assert_all_called=True) as router:
        router.get("http://app.test/contact").respond(200, html=FORM)
        Target("http://app.test", form_path="/contact").check_form_page()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            httpx.ConnectError("[Errno 111] Connection refused"),
            "The target's form page http://app.test/ does not answer ([Errno 111] Connection "
            "refused): start the server first, or correct --target or --form-path.",
        ),
        (
            httpx.Response(404, text="Not Found"),
            "The target's form page http://app.test/ answered with HTTP 404, not 200 with a "
            "form: correct --target or --form-path.",
        ),
        (
            httpx.Response(200, text="<html>maintenance</html>"),
            "The target's form page http://app.test/ answered with no <form, not 200 with a "
            "form: correct --target or --form-path.",
        ),
    ],
    ids=["refused", "404", "no-form"],
)
def test_a_form_page_that_does_not_answer_is_one_sentence(
    answer: httpx.Response | Exception, message: str
) -> None:
    with respx.mock() as router:
        route = router.get("http://app.test/")
        if isinstance(answer, Exception):
            route.side_effect = answer
        else:
            route.return_value = answer
        with pytest.raises(ConfigError) as caught:
            Target("http://app.test/").check_form_page()
    assert str(caught.value) == message


def test_the_fake_port_may_be_any_free_one_but_a_port() -> None:
    assert Target("http://app.test", fakegun_port=0).describe()["fakegun"] == FREE_PORT
    assert Target("http://app.test").describe()["fakegun"] == "started on port 8025"
    with pytest.raises(ConfigError, match="--fakegun-port 70000"):
        Target("http://app.test", fakegun_port=70000)


def test_a_targets_commands_get_the_fakes_url_in_the_environment_and_their_words() -> None:
    target = Target(
        "http://127.0.0.1:9000",
        server_cmd=("app", "--port", "$MAILBENCH_PORT", "--api=${MAILBENCH_MAILGUN_URL}/v3",
                    "$HOME_OF_NOTHING", "100$"),
    )  # fmt: skip
    env = target.environment("http://127.0.0.1:4242", "key-x", "s3cret", index=1)
    assert env["MAILBENCH_MAILGUN_URL"] == "http://127.0.0.1:4242"
    assert (env["MAILGUN_API_KEY"], env["MAILBENCH_SECRET"]) == ("key-x", "s3cret")
    assert (env["MAILBENCH_PORT"], env["MAILBENCH_PROCESS_INDEX"]) == ("9000", "1")
    assert target.command("server", env) == [
        "app", "--port", "9000", "--api=http://127.0.0.1:4242/v3", "$HOME_OF_NOTHING", "100$",
    ]  # fmt: skip
    assert target.command("worker", env) == []
    assert Target("https://example.com").port == 443
