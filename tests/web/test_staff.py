"""The operator's and auditor's view: counts, labels, training jobs behind the operator's
token; models with their attestations verified in the page and their audit reports (summary
and plots) for both; one line for a wrong token."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from collector import jobs
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


def models_with_an_audit_report(tmp_path):
    """pric-male with the shipped audit's report (report.md, report.json, a plot) in its audit/ folder."""
    models = tmp_path / "models"
    for name in ("pric-male", "trusted-auditors"):
        shutil.copytree(ROOT / "exported_models" / name, models / name)
    shipped = ROOT / "docs" / "results-audit" / "shipped"
    (models / "pric-male" / "audit").mkdir()
    for name in ("report.md", "report.json", "plane.png"):
        shutil.copy(shipped / name, models / "pric-male" / "audit" / name)
    return models


def test_operator_and_auditor_views(live, page_of, tmp_path):
    lv = live(MODELS_DIR=str(models_with_an_audit_report(tmp_path)), CURRENT_MODEL="pric-male@6")
    client = lv.app.test_client()
    card = load_card(ROOT / "exported_models" / "pric-male")
    for n_items in (3, 5, 6, 6):
        token = client.post(routes.REGISTER).get_json()["token"]
        rng = np.random.default_rng(n_items)
        batch = UploadBatch(card.model_id, card.sha256, [
            UploadItem(f"{n_items}-{i:04d}", {"feature": rng.normal(size=(4, 8, 8)).astype(np.float32)},
                       labels={"Smiling": i % 2})
            for i in range(n_items)])
        resp = client.post(routes.ITEMS, data=encode_batch_binary(batch), content_type=BINARY_CONTENT_TYPE,
                           headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.get_json()
    # jobs as the queue holds them: one run by a worker to its end (a classifier), one that
    # failed (a task nobody labelled), one still queued
    db, data_dir = lv.app.extensions["pric"].db, tmp_path / "data"
    done, _ = jobs.enqueue(db, "train", {"task": "Smiling", "model_id": card.model_id, "kind": "logistic", "epochs": 5})
    failed, _ = jobs.enqueue(db, "train", {"task": "Male", "model_id": card.model_id, "kind": "logistic", "epochs": 5})
    assert jobs.run_worker(db, data_dir, once=True) == (1, jobs.DONE)
    assert jobs.run_worker(db, data_dir, once=True) == (1, jobs.FAILED)
    queued, _ = jobs.enqueue(db, "train", {"task": "Smiling", "model_id": card.model_id, "kind": "mlp", "epochs": 5})
    result = jobs.get_job(db, done)["result"]
    page = page_of(lv)

    show(page, lv.url, issue_token(lv.app, OPERATOR))
    assert page.text_content("#counts") == "4 participant(s), 20 item(s)."
    assert "pric-male@6" in page.text_content("#by-model") and "20" in page.text_content("#by-model")
    models = page.text_content("#model-list")
    assert "verified: signed by PRIC project release key" in models and "private Male" in models
    rows = page.eval_on_selector_all("#jobs tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert [r[:3] for r in rows[1:]] == [[str(queued), "queued", "Smiling"], [str(failed), "failed", "Male"],
                                         [str(done), "done", "Smiling"]]
    assert rows[3][-1].startswith(f"accuracy {result['accuracy']:.3f}") and "too few items labelled 'Male'" in rows[2][-1]
    assert str(result["classifier"]["id"]) in page.text_content("#classifiers")
    check_audit_report(page)
    screenshot(page, "operator")

    show(page, lv.url, issue_token(lv.app, AUDITOR))
    assert page.is_hidden("#stats") and "verified: signed by PRIC project release key" in page.text_content("#model-list")
    check_audit_report(page)

    show(page, lv.url, "not-a-token")
    assert page.text_content("#alert").startswith("stats: the collector answered 401")
    assert page.is_hidden("#models") and page.is_hidden("#audits")
    # the token never reaches the browser's storage
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0


def check_audit_report(page) -> None:
    """The report's summary (report.md) and its plot, decoded by the browser from a blob: URL."""
    box = page.locator('.audit[data-model="pric-male@6"]')
    assert box.locator(".audit-summary").text_content().startswith("# Privacy audit (pric-audit)")
    img = box.locator("img.plot")
    assert img.count() == 1 and img.get_attribute("alt") == "pric-male@6: plane.png"
    assert img.get_attribute("src").startswith("blob:" + page.url.split("/app/")[0])
    page.wait_for_function("() => [...document.querySelectorAll('img.plot')].every(i => i.complete && i.naturalWidth > 0)")
    assert "report.json" in box.text_content()  # listed beside the summary
