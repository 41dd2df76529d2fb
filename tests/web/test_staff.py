"""The operator's and auditor's view: counts behind the operator's token, models with their
attestations verified in the page for both, one line for a wrong token."""

from __future__ import annotations

import numpy as np
import pytest

from collector.app import issue_token
from collector.auth import AUDITOR, OPERATOR
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, UploadItem, encode_batch_binary

from .conftest import ROOT, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def show(page, url: str, token: str) -> None:
    page.goto(url + routes.WEB_STAFF)
    page.fill("#token", token)
    page.click("#show-btn")
    page.wait_for_function("() => document.body.dataset.shown")


def test_operator_and_auditor_views(live, page_of):
    lv = live()
    client = lv.app.test_client()
    card = load_card(ROOT / "exported_models" / "pric-male")
    for n_items in (3, 5):
        token = client.post(routes.REGISTER).get_json()["token"]
        rng = np.random.default_rng(n_items)
        batch = UploadBatch(card.model_id, card.sha256, [
            UploadItem(f"{n_items}-{i:04d}", {"feature": rng.normal(size=(4, 8, 8)).astype(np.float32)})
            for i in range(n_items)])
        resp = client.post(routes.ITEMS, data=encode_batch_binary(batch), content_type=BINARY_CONTENT_TYPE,
                           headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.get_json()
    page = page_of(lv)

    show(page, lv.url, issue_token(lv.app, OPERATOR))
    assert page.text_content("#counts") == "2 participant(s), 8 item(s)."
    assert "pric-male@6" in page.text_content("#by-model") and "8" in page.text_content("#by-model")
    models = page.text_content("#model-list")
    assert "verified: signed by PRIC project release key" in models and "private Male" in models
    screenshot(page, "operator")

    show(page, lv.url, issue_token(lv.app, AUDITOR))
    assert page.is_hidden("#stats") and "verified: signed by PRIC project release key" in page.text_content("#model-list")

    show(page, lv.url, "not-a-token")
    assert page.text_content("#alert").startswith("stats: the collector answered 401")
    assert page.is_hidden("#models")
    # the token never reaches the browser's storage
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
