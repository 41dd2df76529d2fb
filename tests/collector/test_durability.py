"""A real `pric-collector serve` killed with SIGKILL in the middle of a stream of uploads:
after a restart on the same data folder every acknowledged item is there, every stored
item is complete, and no batch is half stored. And collectors starting together on one
new database all start."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

from collector.app import create_app
from collector.cli import main as cli_main
from collector.launch import start_collector
from collector.registry import list_models
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import UploadBatch, UploadItem, encode_batch, npy_to_array

BATCH = 8


def start_server(data_dir: Path, models_dir: Path, *db: str) -> tuple[subprocess.Popen, str]:
    return start_collector(data_dir, models_dir, "--rate-limit", "0", *db)


def test_sigkill_mid_stream_loses_no_acknowledged_item(tmp_path, tiny_model_dir, capsys, db_args):
    data_dir = tmp_path / "data"
    db = db_args(data_dir)
    card = load_card(tiny_model_dir / "tiny")
    assert cli_main(["token", "create", "--role", "auditor", "--data-dir", str(data_dir), *db]) == 0
    auditor = {"Authorization": "Bearer " + capsys.readouterr().out.strip()}
    proc, url = start_server(data_dir, tiny_model_dir, *db)
    acked: list[int] = []
    try:
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
        rng = np.random.default_rng(0)
        stop = threading.Event()

        def stream() -> None:
            with requests.Session() as s:
                for b in range(100_000):
                    if stop.is_set():
                        return
                    items = [UploadItem(f"b{b}-{i}", {"feature": rng.standard_normal((16, 8, 8)).astype(np.float32)},
                                        {"Smiling": i % 2}) for i in range(BATCH)]
                    body = encode_batch(UploadBatch(card.model_id, card.sha256, items))
                    try:
                        resp = s.post(url + routes.ITEMS, data=body, headers=auth, timeout=10)
                    except requests.RequestException:
                        return  # the server is gone
                    if resp.status_code == 200 and resp.json()["stored"] == BATCH:
                        acked.append(b)

        thread = threading.Thread(target=stream)
        thread.start()
        deadline = time.monotonic() + 20
        while len(acked) < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL, while the stream is still sending
        proc.wait(timeout=10)
        stop.set()
        thread.join(timeout=15)
        assert len(acked) >= 15, "the stream did not get going before the deadline"

        proc, url = start_server(data_dir, tiny_model_dir, *db)
        stored: list[dict] = []
        offset: int | None = 0
        while offset is not None:
            page = requests.get(url + routes.EXPORT, params={"offset": offset, "limit": 500},
                                headers=auditor, timeout=10).json()
            stored += page["items"]
            offset = page["next_offset"]
        me = requests.get(url + routes.ME, headers=auth, timeout=10).json()
        retry = requests.post(url + routes.ITEMS, headers=auth, timeout=10, data=encode_batch(UploadBatch(
            card.model_id, card.sha256,
            [UploadItem(f"b{acked[0]}-{i}", {"feature": np.zeros((16, 8, 8), np.float32)}, {}) for i in range(BATCH)])))
    finally:
        proc.kill()
        proc.wait(timeout=10)

    ids = {item["item_id"] for item in stored}
    assert all(f"b{b}-{i}" in ids for b in acked for i in range(BATCH)), "an acknowledged item was lost"
    assert me["items"] == len(stored) == len(ids)
    per_batch = Counter(item_id.split("-")[0] for item_id in ids)
    assert set(per_batch.values()) == {BATCH}, "a batch was stored in part"
    for item in stored:
        arr = npy_to_array(base64.b64decode(item["arrays"]["feature"]))
        assert arr.shape == (16, 8, 8) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert retry.json() == {"stored": 0, "duplicates": BATCH}


def test_collectors_starting_together_on_a_new_database_all_start(tmp_path, tiny_model_dir):
    """Six collectors (each its own engine, like six processes) create one new database at
    once: none fails on a table, model or secret another one created first."""
    n = 6
    barrier = threading.Barrier(n)
    apps, errors = [], []

    def start() -> None:
        barrier.wait()
        try:
            apps.append(create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir)}))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len({app.extensions["pric"].pseudonym_secret for app in apps}) == 1
        assert [m["status"] for m in list_models(apps[0].extensions["pric"].db)] == ["active"]
    finally:
        for app in apps:
            app.extensions["pric"].db.dispose()
