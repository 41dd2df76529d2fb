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
