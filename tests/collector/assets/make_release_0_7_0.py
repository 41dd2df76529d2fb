"""Writes release-0.7.0.sql, the SQL dump of a small collector data folder made by the
0.7.0 collector (commit 39c1434, before Alembic migrations), for test_migrations.py, and
release-0.7.0.tokens.json: the plaintext of its throw-away test tokens (the database holds
only their hashes), so that the test can call the upgraded collector with them.

Run with that release's code on the path, e.g.

    git archive 39c1434 | tar -x -C /tmp/pric-0.7.0
    PYTHONPATH=/tmp/pric-0.7.0 python tests/collector/assets/make_release_0_7_0.py tests/collector/assets

It registers three participants (one invited), uploads labelled items of the tiny test
model, creates an operator and an auditor token, trains a classifier and withdraws one
participant's items, so that every table holds rows.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(out_dir: str) -> None:
    root = Path(sys.modules["collector"].__file__ if "collector" in sys.modules else __import__("collector").__file__)
    spec = importlib.util.spec_from_file_location("root_conftest", root.parents[1] / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    from collector.app import create_app, issue_token
    from collector.auth import create_invites
    from protocol import routes
    from protocol.wire import UploadBatch, UploadItem, encode_batch

    with tempfile.TemporaryDirectory() as tmp:
        card = conftest.write_tiny_features_model(Path(tmp) / "models" / "tiny")
        data = Path(tmp) / "data"
        app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(Path(tmp) / "models"), "ALLOW_UNATTESTED": True,
                          "REGISTRATION": "invite"})
        client = app.test_client()
        plain = {"operator": issue_token(app, "operator"), "auditor": issue_token(app, "auditor")}
        operator = {"Authorization": "Bearer " + plain["operator"]}
        invite = create_invites(app.extensions["pric"].db, 2)[0]
        rng = np.random.default_rng(7)
        tokens = []
        for p in range(3):
            headers = {routes.ENROLMENT_HEADER: invite} if p == 0 else operator
            reg = client.post(routes.REGISTER, headers=headers)
            assert reg.status_code == 201, reg.json
            auth = {"Authorization": "Bearer " + reg.json["token"]}
            tokens.append(auth)
            plain[f"participant{p}"] = reg.json["token"]
            items = [UploadItem(f"p{p}-{i}", {"feature": (rng.standard_normal((16, 8, 8)) + (i % 2)).astype(np.float32)},
                                {"Smiling": i % 2, "Male": p % 2}) for i in range(6)]
            resp = client.post(routes.ITEMS, data=encode_batch(UploadBatch(card.model_id, card.sha256, items)),
                               headers=auth, content_type="application/json")
            assert resp.json == {"stored": 6, "duplicates": 0}, resp.json
        trained = client.post(routes.TRAIN, json={"task": "Smiling"}, headers=operator)
        assert trained.status_code == 200, trained.json
        assert client.delete(routes.ME, headers=tokens[2], query_string={"keep_token": "1"}).json["deleted"] == 6
        app.extensions["pric"].db.dispose()
        conn = sqlite3.connect(data / "collector.sqlite3")
        Path(out_dir, "release-0.7.0.sql").write_text("\n".join(conn.iterdump()) + "\n", encoding="utf-8")
        Path(out_dir, "release-0.7.0.tokens.json").write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
