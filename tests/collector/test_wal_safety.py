"""Issue 16, item 2: nothing acknowledged is lost silently when the SQLite WAL goes
missing or is damaged; a clean stop leaves the data in the main database file; a backup
taken while the server runs restores every item."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import requests

import collector.db
from collector.app import create_app
from collector.cli import main as cli_main
from collector.db import DB_FILE, HIGH_WATER_SUFFIX, DatabaseBehindError
from collector.launch import start_collector, stop
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, UploadItem, encode_batch_binary

pytestmark = pytest.mark.sqlite_only("SQLite WAL and files only")


def _upload(client, card, n_batches: int, per_batch: int = 5) -> tuple[dict[str, str], int]:
    token = client.post(routes.REGISTER).json["token"]
    h = {"Authorization": "Bearer " + token}
    for b in range(n_batches):
        items = [UploadItem(f"b{b}-{i}", {"feature": np.full((16, 8, 8), b + i, np.float32)}, {"Smiling": i % 2})
                 for i in range(per_batch)]
        resp = client.post(routes.ITEMS, data=encode_batch_binary(UploadBatch(card.model_id, card.sha256, items)),
                           headers=h, content_type=BINARY_CONTENT_TYPE)
        assert resp.status_code == 200 and resp.json["stored"] == per_batch
    return h, n_batches * per_batch


def _crash_copy(data_dir: Path, dest: Path, wal: str) -> Path:
    """What a crash leaves on disk, copied while the collector still runs: the database
    file, the high-water file and the WAL whole, truncated or not at all."""
    dest.mkdir()
    shutil.copy(data_dir / DB_FILE, dest / DB_FILE)
    shutil.copy(data_dir / (DB_FILE + HIGH_WATER_SUFFIX), dest / (DB_FILE + HIGH_WATER_SUFFIX))
    wal_bytes = (data_dir / (DB_FILE + "-wal")).read_bytes()
    if wal == "whole":
        (dest / (DB_FILE + "-wal")).write_bytes(wal_bytes)
    elif wal == "truncated":
        (dest / (DB_FILE + "-wal")).write_bytes(wal_bytes[: len(wal_bytes) // 2])
    return dest


def _count(db_file: Path) -> int:
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("wal", ["deleted", "truncated"])
def test_a_lost_or_damaged_wal_refuses_to_start_in_one_line(tmp_path, tiny_model_dir, capsys, wal):
    data = tmp_path / "data"
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    try:
        _, n = _upload(app.test_client(), load_card(tiny_model_dir / "tiny"), 12)
        assert (data / (DB_FILE + "-wal")).stat().st_size > 0, "the uploads are still in the WAL only"
        damaged = _crash_copy(data, tmp_path / "damaged", wal)
        intact = _crash_copy(data, tmp_path / "intact", "whole")
    finally:
        app.extensions["pric"].db.dispose()

    with pytest.raises(DatabaseBehindError) as err:
        create_app({"DATA_DIR": str(damaged), "MODELS_DIR": str(tiny_model_dir)})
    assert str(damaged / DB_FILE) in err.value.message and HIGH_WATER_SUFFIX in err.value.message

    assert cli_main(["stats", "--data-dir", str(damaged)]) == 10
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "acknowledged" in lines[0] and f"{DB_FILE}-wal" in lines[0]
    assert cli_main(["serve", "--data-dir", str(damaged), "--models-dir", str(tiny_model_dir), "--port", "0"]) == 10
    assert "acknowledged" in capsys.readouterr().err

    # The same crash with the WAL intact loses nothing and starts.
    ok = create_app({"DATA_DIR": str(intact), "MODELS_DIR": str(tiny_model_dir)})
    try:
        assert cli_main(["stats", "--data-dir", str(intact), "--json"]) == 0
        assert f'"items": {n}' in capsys.readouterr().out
    finally:
        ok.extensions["pric"].db.dispose()


def test_a_database_file_replaced_by_an_older_copy_or_removed_is_refused(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    card = load_card(tiny_model_dir / "tiny")
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    client = app.test_client()
    _upload(client, card, 1)
    app.extensions["pric"].db.dispose()
    old = tmp_path / "old.sqlite3"
    shutil.copy(data / DB_FILE, old)
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    _upload(app.test_client(), card, 1)
    app.extensions["pric"].db.dispose()
    shutil.copy(old, data / DB_FILE)
    with pytest.raises(DatabaseBehindError):
        create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    (data / DB_FILE).unlink()
    with pytest.raises(DatabaseBehindError, match="missing"):
        create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    assert not (data / DB_FILE).exists(), "the refusal created no empty database"


def test_clean_stop_of_the_server_leaves_the_data_in_the_main_file(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    card = load_card(tiny_model_dir / "tiny")
    proc, url = start_collector(data, tiny_model_dir, "--rate-limit", "0")
    try:
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        items = [UploadItem(f"i{i}", {"feature": np.zeros((16, 8, 8), np.float32)}, {}) for i in range(30)]
        resp = requests.post(url + routes.ITEMS, data=encode_batch_binary(UploadBatch(card.model_id, card.sha256, items)),
                             headers={"Authorization": "Bearer " + token, "Content-Type": BINARY_CONTENT_TYPE},
                             timeout=10)
        assert resp.json() == {"stored": 30, "duplicates": 0}
    finally:
        stop(proc)  # SIGTERM
    assert proc.returncode == 0
    wal = data / (DB_FILE + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(data / DB_FILE, alone / DB_FILE)  # the database file without its WAL
    assert _count(alone / DB_FILE) == 30


def test_the_wal_is_checkpointed_periodically(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(collector.db, "CHECKPOINT_INTERVAL_S", 0.0)
    data = tmp_path / "data"
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    try:
        _, n = _upload(app.test_client(), load_card(tiny_model_dir / "tiny"), 3)
        alone = tmp_path / "alone"
        alone.mkdir()
        shutil.copy(data / DB_FILE, alone / DB_FILE)  # while the server runs
        assert _count(alone / DB_FILE) == n
    finally:
        app.extensions["pric"].db.dispose()


def test_online_backup_restores_every_item_and_token(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    card = load_card(tiny_model_dir / "tiny")
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    try:
        h, n = _upload(app.test_client(), card, 7)
        out = tmp_path / "backup.sqlite3"
        assert cli_main(["backup", "--data-dir", str(data), "--out", str(out)]) == 0  # the app is still open
        assert f"{n} items, 1 participants" in capsys.readouterr().out
        assert cli_main(["backup", "--data-dir", str(data), "--out", str(out)]) == 2  # never overwrites
        assert "already exists" in capsys.readouterr().err
    finally:
        app.extensions["pric"].db.dispose()
    assert not Path(str(out) + "-wal").exists()
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(out, restored / DB_FILE)
    app = create_app({"DATA_DIR": str(restored), "MODELS_DIR": str(tiny_model_dir)})
    try:
        assert app.test_client().get(routes.ME, headers=h).json["items"] == n
    finally:
        app.extensions["pric"].db.dispose()


def test_backup_of_a_postgresql_database_gives_pg_dump_advice(tmp_path, capsys):
    rc = cli_main(["backup", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b"),
                   "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none"])
    err = capsys.readouterr().err
    assert rc == 2 and "pg_dump" in err and len(err.strip().splitlines()) == 1
