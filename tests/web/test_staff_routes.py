"""The staff routes behind the operator's view: recent jobs (operator), a model's audit
report (operator and auditor) served from <model dir>/audit/ with strict names, no links,
only .json/.md/.png within the size limit. No browser needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from collector import jobs
from collector.app import create_app, issue_token
from collector.auth import AUDITOR, OPERATOR
from protocol import routes

from .conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


@pytest.fixture
def kit(tmp_path: Path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "exported_models" / "pric-male", models / "pric-male")
    shutil.copytree(ROOT / "exported_models" / "trusted-auditors", models / "trusted-auditors")
    audit = models / "pric-male" / "audit"
    audit.mkdir()
    (audit / "report.json").write_text('{"headline": {"Male": 0.66}}')
    (audit / "report.md").write_text("# Privacy audit\n")
    (audit / "plane.png").write_bytes(PNG)
    (audit / "notes.txt").write_text("not served")
    (audit / "fake.png").write_bytes(b"<script>alert(1)</script>")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (audit / "link.json").symlink_to(tmp_path / "secret.json")
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(models), "READ_LIMIT_PER_MIN": 0})
    client = app.test_client()
    participant = client.post(routes.REGISTER).get_json()["token"]
    tokens = {"participant": participant, OPERATOR: issue_token(app, OPERATOR), AUDITOR: issue_token(app, AUDITOR)}
    yield app, client, {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}, audit
    app.extensions["pric"].db.dispose()


def test_the_audit_report_is_listed_and_served_to_staff_only(kit):
    app, client, auth, _audit = kit
    listing = routes.model_audit_url("pric-male@6")
    for role in (OPERATOR, AUDITOR):
        resp = client.get(listing, headers=auth[role])
        assert resp.status_code == 200
        # the link and the .txt are left out (a .png that is not one is listed, but not served)
        assert [f["name"] for f in resp.json["files"]] == ["fake.png", "plane.png", "report.json", "report.md"]
        assert resp.json["files"][1] == {"name": "plane.png", "bytes": len(PNG), "type": "image/png"}
        png = client.get(routes.model_audit_url("pric-male@6", "plane.png"), headers=auth[role])
        assert png.status_code == 200 and png.data == PNG and png.mimetype == "image/png"
        assert "sandbox" in png.headers["Content-Security-Policy"] and png.headers["X-Content-Type-Options"] == "nosniff"
        md = client.get(routes.model_audit_url("pric-male@6", "report.md"), headers=auth[role])
        assert md.data == b"# Privacy audit\n" and md.headers["Content-Disposition"].startswith("attachment")
    for url in (listing, routes.model_audit_url("pric-male@6", "plane.png")):
        assert client.get(url, headers=auth["participant"]).status_code == 403
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401


@pytest.mark.parametrize("name", ["..%2Fmodel_card.json", "..", "link.json", "notes.txt", "fake.png",
                                  ".hidden.json", "model_card.json", "report.json%00.png", "%2Fetc%2Fpasswd",
                                  "report..json", "REPORT.JSON"])
def test_traversal_links_and_other_files_are_refused(kit, name):
    _app, client, auth, _audit = kit
    resp = client.get(routes.model_audit_url("pric-male@6", name), headers=auth[OPERATOR])
    assert resp.status_code == 404, (name, resp.status_code)
    assert b"secret" not in resp.data and b"model_id" not in resp.data


def test_a_fifo_is_neither_listed_nor_read(kit):
    _app, client, auth, audit = kit
    os.mkfifo(audit / "pipe.json")
    names = [f["name"] for f in client.get(routes.model_audit_url("pric-male@6"), headers=auth[OPERATOR]).json["files"]]
    assert "pipe.json" not in names
    assert client.get(routes.model_audit_url("pric-male@6", "pipe.json"), headers=auth[OPERATOR]).status_code == 404


def test_a_file_swapped_for_a_fifo_after_the_listing_is_not_read(kit, monkeypatch):
    """The race: listed as a plain file, a FIFO when opened; answered 404 at once, not blocking."""
    import types

    import collector.app as app_module

    _app, client, auth, audit = kit
    os.mkfifo(audit / "pipe.json")
    monkeypatch.setattr(app_module, "_audit_entries", lambda folder: [types.SimpleNamespace(name="pipe.json")])
    assert client.get(routes.model_audit_url("pric-male@6", "pipe.json"), headers=auth[OPERATOR]).status_code == 404


def test_a_file_over_the_limit_is_not_served(kit, monkeypatch):
    _app, client, auth, audit = kit
    monkeypatch.setattr(routes, "MAX_AUDIT_FILE_BYTES", 20)
    assert client.get(routes.model_audit_url("pric-male@6", "report.md"), headers=auth[OPERATOR]).status_code == 200
    (audit / "report.md").write_text("# a longer report than twenty bytes\n")
    assert client.get(routes.model_audit_url("pric-male@6", "report.md"), headers=auth[OPERATOR]).status_code == 404
    names = [f["name"] for f in client.get(routes.model_audit_url("pric-male@6"), headers=auth[OPERATOR]).json["files"]]
    assert "report.md" not in names


def test_a_model_without_an_audit_folder_lists_none_and_an_unknown_model_is_404(kit):
    _app, client, auth, audit = kit
    shutil.rmtree(audit)
    assert client.get(routes.model_audit_url("pric-male@6"), headers=auth[AUDITOR]).json["files"] == []
    assert client.get(routes.model_audit_url("nope@1"), headers=auth[AUDITOR]).status_code == 404


def test_recent_jobs_newest_first_filtered_by_status_for_the_operator(kit):
    app, client, auth, _audit = kit
    db = app.extensions["pric"].db
    first, _ = jobs.enqueue(db, "train", {"task": "Smiling", "model_id": "pric-male@6", "kind": "logistic", "epochs": 5})
    second, _ = jobs.enqueue(db, "train", {"task": "Male", "model_id": "pric-male@6", "kind": "logistic", "epochs": 5})
    claim = jobs.claim_next(db)
    jobs.mark_failed(db, claim, "too few items", retry=False)
    listed = client.get(routes.JOBS, headers=auth[OPERATOR]).json["jobs"]
    assert [j["id"] for j in listed] == [second, first]
    assert [j["status"] for j in listed] == ["queued", "failed"] and listed[1]["error"] == "too few items"
    assert "claim" not in listed[0]
    failed = client.get(routes.JOBS, query_string={"status": "failed", "limit": 1}, headers=auth[OPERATOR]).json
    assert [j["id"] for j in failed["jobs"]] == [first]
    assert client.get(routes.JOBS, query_string={"status": "lost"}, headers=auth[OPERATOR]).status_code == 400
    assert client.get(routes.JOBS, query_string={"limit": 0}, headers=auth[OPERATOR]).status_code == 400
    assert client.get(routes.JOBS, headers=auth[AUDITOR]).status_code == 403
    assert client.get(routes.JOBS, headers=auth["participant"]).status_code == 403
