"""End to end against a real collector (live_collector): register, upload, status,
withdraw, dry run, tampered model, labels."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import requests

from protocol.model_card import load_card
from protocol.wire import npy_to_array


def _photos(tmp_path: Path, sample_images: list[Path], corrupt: bool = True) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for n, p in enumerate(sample_images):
        (folder / ("sub" if n % 2 else "") / p.name).write_bytes(p.read_bytes())
    if corrupt:
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return folder


def _me(live_collector, home: Path) -> dict:
    token = json.loads((home / "config.json").read_text())["token"]
    return requests.get(f"{live_collector.url}/api/v1/participants/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()


def test_register_stores_private_config(registered_home: Path, live_collector) -> None:
    cfg = registered_home / "config.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert json.loads(cfg.read_text())["server"] == live_collector.url


def test_upload_twice_then_status_and_withdraw(cli, registered_home: Path, live_collector, tmp_path: Path,
                                               sample_images: list[Path], sample_faces: Path) -> None:
    folder = _photos(tmp_path, sample_images)
    home = str(registered_home)
    n = len(sample_images)

    first = cli("--home", home, "upload", "--yes", str(folder), "--labels", str(sample_faces / "labels.csv"),
                "--tasks", "Smiling,Male", "--batch-size", "16")
    assert first.rc == 0, first.err
    err_lines = [l for l in first.err.splitlines() if l.strip()]
    assert len(err_lines) == 1 and "corrupt.jpg" in err_lines[0]
    assert first.out.strip().splitlines()[-1] == f"{n} stored, 0 already there, 1 skipped (errors)"
    assert _me(live_collector, registered_home)["items"] == n

    second = cli("--home", home, "upload", "--yes", str(folder), "--batch-size", "16")
    assert second.rc == 0
    assert second.out.strip().splitlines()[-1] == f"0 stored, {n} already there, 1 skipped (errors)"

    status = cli("--home", home, "status", "--json")
    report = json.loads(status.out)
    assert status.rc == 0
    assert report["items"] == n and sum(report["journal"].values()) == n
    assert sum(report["items_by_model"].values()) == n

    out = cli("--home", home, "withdraw", "--keep-token")
    assert out.rc == 0 and f"withdrew {n} items" in out.out and "revoked" not in out.out
    assert _me(live_collector, registered_home)["items"] == 0
    after = json.loads(cli("--home", home, "status", "--json").out)
    assert after["items"] == 0 and sum(after["journal"].values()) == 0


def test_withdraw_revokes_the_token_and_forgets_the_registration(cli, registered_home: Path, live_collector,
                                                                  tmp_path: Path, sample_images: list[Path]) -> None:
    folder = _photos(tmp_path, sample_images[:4], corrupt=False)
    home = str(registered_home)
    token = json.loads((registered_home / "config.json").read_text())["token"]
    assert cli("--home", home, "upload", "--yes", str(folder)).rc == 0

    out = cli("--home", home, "withdraw")

    assert out.rc == 0 and "withdrew 4 items" in out.out and "revoked" in out.out
    assert not (registered_home / "config.json").exists()
    me = requests.get(live_collector.url + "/api/v1/participants/me", timeout=10,
                      headers={"Authorization": "Bearer " + token})
    assert me.status_code == 401
    status = cli("--home", home, "status")
    assert status.rc == 2 and "register" in status.err


def test_journal_loss_still_stores_once(cli, registered_home: Path, live_collector, tmp_path: Path,
                                        sample_images: list[Path]) -> None:
    """Without the journal the collector's idempotency answers duplicates, not new items."""
    folder = _photos(tmp_path, sample_images[:10], corrupt=False)
    assert cli("--home", str(registered_home), "upload", "--yes", str(folder)).rc == 0
    (registered_home / "journal.sqlite").unlink()
    for side in ("-wal", "-shm"):
        Path(str(registered_home / "journal.sqlite") + side).unlink(missing_ok=True)
    res = cli("--home", str(registered_home), "upload", "--yes", str(folder))
    assert res.out.strip().endswith("0 stored, 10 already there, 0 skipped (errors)")
    assert _me(live_collector, registered_home)["items"] == 10


def test_dry_run_sends_nothing(cli, registered_home: Path, live_collector, tmp_path: Path,
                               sample_images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _photos(tmp_path, sample_images[:12])
    real_request = requests.Session.request

    def refuse_posts(self, method, url, *a, **kw):
        if method.upper() == "POST":
            raise AssertionError("dry run must not POST")
        return real_request(self, method, url, *a, **kw)

    monkeypatch.setattr(requests.Session, "request", refuse_posts)
    res = cli("--home", str(registered_home), "upload", "--yes", str(folder), "--dry-run")
    assert res.rc == 0, res.err
    assert "dry run: 12 items would be sent" in res.out and "tiny@1" in res.out and "1 skipped" in res.out
    last = res.out.strip().splitlines()[-1]  # the consent summary comes before it
    sent_bytes = int(last.split("(")[1].split(" bytes")[0])
    assert sent_bytes > 12 * 16 * 8 * 8 * 4  # at least the raw float32 features
    assert _me(live_collector, registered_home)["items"] == 0


def test_model_is_cached_verified_and_tampering_refused(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                        sample_images: list[Path]) -> None:
    folder = _photos(tmp_path, sample_images[:3], corrupt=False)
    assert cli("--home", str(registered_home), "upload", "--yes", str(folder)).rc == 0
    cached = registered_home / "models" / "tiny@1"
    card = load_card(cached)  # verifies the sha256
    assert card.sha256 == load_card(live_collector.models_dir / "tiny").sha256

    model = cached / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    more = _photos(tmp_path / "more", sample_images[3:6], corrupt=False)
    res = cli("--home", str(registered_home), "upload", "--yes", str(more))
    assert res.rc == 4
    assert "sha256" in res.err and "model.onnx" in res.err
    assert _me(live_collector, registered_home)["items"] == 3

    offline = cli("--home", str(registered_home), "transform", str(more), "--out", str(tmp_path / "o.npz"))
    assert offline.rc == 4 and not (tmp_path / "o.npz").exists()


def test_upload_features_match_offline_transform(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                 sample_images: list[Path]) -> None:
    """What the collector stores is what `transform` computes from the same model."""
    folder = _photos(tmp_path, sample_images[:4], corrupt=False)
    assert cli("--home", str(registered_home), "upload", "--yes", str(folder)).rc == 0
    res = cli("--home", str(registered_home), "transform", str(folder), "--out", str(tmp_path / "f.npz"))
    assert res.rc == 0
    export = requests.get(f"{live_collector.url}/api/v1/export", params={"model_id": "tiny@1"},
                          headers={"Authorization": f"Bearer {live_collector.auditor_token}"}, timeout=10)
    assert export.status_code == 200, export.text
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        local = dict(zip(z["item_ids"].tolist(), z["features"]))
    stored = {
        it["item_id"]: npy_to_array(base64.b64decode(it["arrays"]["feature"])) for it in export.json()["items"]
    }
    assert set(stored) == set(local) and len(stored) == 4
    for item_id, feature in stored.items():
        np.testing.assert_array_equal(feature, local[item_id])


def test_unreachable_server_is_exit_9(cli, home: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli("--home", str(home), "register", "--server", f"http://127.0.0.1:{port}")
    assert res.rc == 9
    assert len(res.err.strip().splitlines()) == 1 and "cannot reach the collector" in res.err
