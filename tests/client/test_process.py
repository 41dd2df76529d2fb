"""Tests that run the client as a real process: no torch is ever imported, and an upload
killed with SIGKILL then rerun stores every photo exactly once."""

from __future__ import annotations

import pytest

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_client_never_imports_torch(tmp_path: Path, sample_images: list[Path], features_model_dir: Path) -> None:
    code = f"""
import sys
import client.cli
from client.cli import main
assert "torch" not in sys.modules, "import client.cli loaded torch"
rc = main(["--home", {str(tmp_path / 'h')!r}, "transform", {str(sample_images[0].parent)!r},
           "--out", {str(tmp_path / 'f.npz')!r}, "--model-dir", {str(features_model_dir)!r}])
print(rc, "torch" in sys.modules, "onnxruntime" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["0", "False", "True"]
    assert (tmp_path / "f.npz").is_file()


def _server_items(url: str, token: str) -> int:
    return int(requests.get(f"{url}/api/v1/participants/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["items"])


def _stored_rows(collector) -> int:
    """Items the live collector stored, read from its database: polled every 20 ms, which
    the API's per-token read limit would (rightly) answer 429."""
    from sqlalchemy import func, select

    from collector.db import items

    with collector.app.extensions["pric"].db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(items)).scalar_one())


def _journal_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=5) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


@pytest.mark.slow
def test_sigkill_between_ack_and_journal_then_rerun_stores_exactly_once(
    cli, registered_home: Path, live_collector, tmp_path: Path, sample_images: list[Path]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images:
        (folder / p.name).write_bytes(p.read_bytes())
    token = json.loads((registered_home / "config.json").read_text())["token"]
    journal = registered_home / "journal.sqlite"
    cmd = [sys.executable, "-m", "client.cli", "--home", str(registered_home), "upload", "--yes", str(folder), "--batch-size", "4"]
    # the hook sleeps before each POST and again between its acknowledgement and the journal commit
    proc = subprocess.Popen(cmd, env=_env(PRIC_CLIENT_TEST_DELAY_S="0.25"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            on_server, journalled = _stored_rows(live_collector), _journal_rows(journal)
            if on_server >= 8 and on_server > journalled:  # acknowledged, not yet journalled
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = (on_server, journalled)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=10)
    assert killed_at is not None, "the upload finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    before = _server_items(live_collector.url, token)
    assert before < len(sample_images)

    res = cli("--home", str(registered_home), "upload", "--yes", str(folder), "--batch-size", "4")

    assert res.rc == 0, res.err
    assert res.out.strip().splitlines()[-1] == f"{len(sample_images) - before} stored, {before} already there, 0 skipped (errors)"
    assert _server_items(live_collector.url, token) == len(sample_images)
    assert _journal_rows(journal) == len(sample_images)
