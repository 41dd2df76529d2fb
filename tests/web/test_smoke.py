"""The page loads under its CSP and runs a model in onnxruntime-web."""
import pytest

pytestmark = pytest.mark.browser


def test_page_loads_and_shows_join(live, page_of):
    lv = live()
    page = page_of(lv)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(lv.url + "/app/")
    page.wait_for_selector("#join:not([hidden])")
    assert errors == []


@pytest.mark.slow
def test_insecure_context_is_named(live, page_of):
    """Over plain http to another host the browser withholds WebCrypto: the page says so
    (simulated here: the tests' collector is on loopback, which browsers treat as secure)."""
    lv = live()
    page = page_of(lv)
    page.add_init_script("Object.defineProperty(window, 'isSecureContext', {value: false})")
    page.goto(lv.url + "/app/")
    page.wait_for_selector("#alert:not([hidden])")
    assert "must be opened over HTTPS" in page.text_content("#alert") and page.is_hidden("#join")
    assert not [r for r in lv.requests if "/api/" in r["url"]]
