"""What GET / adds to the pre-rendered form: reading the CSRF cookie, the token, the page.

The form page is the benchmark's control request (~100-200 µs on loopback), so its CSRF
work is timed here: a returning visitor (cookie sent, token reused within a minute) and a
first visit (new cookie, fresh signature, Set-Cookie).
"""

from __future__ import annotations

from pytest_benchmark.fixture import BenchmarkFixture

from servers.web.csrf import COOKIE, Csrf
from servers.web.forms import empty_form

CSRF = Csrf("microbench-secret")
COOKIE_VALUE = Csrf.new_cookie()
HEADER = f"theme=dark; {COOKIE}={COOKIE_VALUE}; lang=en"


def returning_visitor() -> bytes:
    cookie = Csrf.cookie_in(HEADER)
    assert cookie is not None
    return empty_form(CSRF.token(cookie))


def first_visit() -> tuple[bytes, str]:
    assert Csrf.cookie_in("theme=dark") is None
    cookie = Csrf.new_cookie()
    return empty_form(CSRF.token(cookie)), Csrf.set_cookie_header(cookie)


def test_form_page_for_a_returning_visitor(benchmark: BenchmarkFixture) -> None:
    page = benchmark(returning_visitor)
    token = CSRF.token(COOKIE_VALUE)
    assert f'name="csrf_token" value="{token}"'.encode() in page
    CSRF.check(COOKIE_VALUE, token)


def test_form_page_for_a_first_visit(benchmark: BenchmarkFixture) -> None:
    page, set_cookie = benchmark(first_visit)
    assert set_cookie.startswith(f"{COOKIE}=") and "SameSite=Strict" in set_cookie
    assert b'name="csrf_token" value="' in page
