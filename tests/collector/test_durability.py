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
import pytest
import requests

from collector.app import create_app
from collector.auth import create_participant
from collector.cli import main as cli_main
from collector.launch import start_collector
from collector.registry import list_models
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    UploadBatch,
    UploadItem,
    encode_batch,
    encode_batch_binary,
    npy_to_array,
)

BATCH = 8


def start_server(data_dir: Path, models_dir: Path, *db: str, workers: int = 1) -> tuple[subprocess.Popen, str]:
    return start_collector(data_dir, models_dir, "--rate-limit", "0", "--read-rate-limit", "0",
                           "--register-rate-limit", "0", "--workers", str(workers), *db)


@pytest.mark.slow
@pytest.mark.parametrize("workers, wire", [(1, "json"), (2, "binary")])
def test_sigkill_mid_stream_loses_no_acknowledged_item(tmp_path, tiny_model_dir, capsys, db_args, workers, wire):
    """The gunicorn master is killed; its worker processes (one or two) leave with it."""
    encode, content_type = (encode_batch, JSON_CONTENT_TYPE) if wire == "json" else (encode_batch_binary, BINARY_CONTENT_TYPE)
    data_dir = tmp_path / "data"
    db = db_args(data_dir)
    card = load_card(tiny_model_dir / "tiny")
    assert cli_main(["token", "create", "--role", "auditor", "--data-dir", str(data_dir), *db]) == 0
    auditor = {"Authorization": "Bearer " + capsys.readouterr().out.strip()}
    proc, url = start_server(data_dir, tiny_model_dir, *db, workers=workers)
    acked: list[int] = []
    try:
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        auth = {"Authorization": "Bearer " + token, "Content-Type": content_type}
        rng = np.random.default_rng(0)
        stop = threading.Event()

        def stream() -> None:
            with requests.Session() as s:
                for b in range(100_000):
                    if stop.is_set():
                        return
                    items = [UploadItem(f"b{b}-{i}", {"feature": rng.standard_normal((16, 8, 8)).astype(np.float32)},
                                        {"Smiling": i % 2}) for i in range(BATCH)]
                    body = encode(UploadBatch(card.model_id, card.sha256, items))
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
        workers_before = _children(proc.pid)
        proc.kill()  # SIGKILL, while the stream is still sending
        proc.wait(timeout=10)
        stop.set()
        thread.join(timeout=15)
        assert len(acked) >= 15, "the stream did not get going before the deadline"
        assert len(workers_before) == workers
        _wait_gone(workers_before)

        proc, url = start_server(data_dir, tiny_model_dir, *db)
        stored: list[dict] = []
        offset: int | None = 0
        while offset is not None:
            page = requests.get(url + routes.EXPORT, params={"offset": offset, "limit": 500},
                                headers=auditor, timeout=10).json()
            stored += page["items"]
            offset = page["next_offset"]
        me = requests.get(url + routes.ME, headers=auth, timeout=10).json()
        retry = requests.post(url + routes.ITEMS, headers=auth, timeout=10, data=encode(UploadBatch(
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


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker processes {alive} outlived their killed parent")


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


@pytest.mark.sqlite_only("holds SQLite's in-process write lock (PostgreSQL writers take an advisory lock)")
def test_batches_arriving_while_the_leader_waits_for_the_write_lock_join_its_commit(tmp_path, tiny_model_dir):
    """Group commit: the leader takes the queue only once it holds the write lock, so the
    batches that arrive while it waits (another worker process committing) are written by
    the same commit (one fsync), each answered with its own counts."""
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir)})
    state = app.extensions["pric"]
    if state.db._write_lock is None:
        state.db.dispose()
        pytest.skip("holds SQLite's in-process write lock (PostgreSQL writers take an advisory lock)")
    store, card = state.items_store, load_card(tiny_model_dir / "tiny")
    results: dict[str, tuple[int, int]] = {}
    ids = {who: create_participant(state.db)[0] for who in "abc"}

    def upload(who: str, n: int) -> None:
        items = [UploadItem(f"{who}-{k}", {"feature": np.zeros((16, 8, 8), np.float32)}, {}) for k in range(n)]
        results[who] = store.store(ids[who], UploadBatch(card.model_id, card.sha256, items))

    try:
        state.db._write_lock.acquire()  # another writer holds the lock
        threads = {who: threading.Thread(target=upload, args=(who, n)) for who, n in (("a", 1), ("b", 2), ("c", 3))}
        threads["a"].start()
        deadline = time.monotonic() + 10
        while not store._flushing and time.monotonic() < deadline:
            time.sleep(0.005)
        threads["b"].start()
        threads["c"].start()
        while {j.participant_id for j in store._queue} != set(ids.values()) and time.monotonic() < deadline:
            time.sleep(0.005)
        flushes = store.flushes
        state.db._write_lock.release()
        for t in threads.values():
            t.join(timeout=30)
        assert results == {"a": (1, 0), "b": (2, 0), "c": (3, 0)}
        assert store.flushes - flushes == 1 and store.jobs_flushed == 3
    finally:
        state.db.dispose()
