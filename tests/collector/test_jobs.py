"""Training as jobs (collector.jobs): POST TRAIN queues, `pric-collector worker` runs, GET
JOB and `pric-collector jobs` report; claims are exclusive, leases expire, a killed worker's
job is retried by another and failed after its last attempt, SIGTERM requeues; the serving
process never imports torch; the held-out side is a set of participants (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from collector import jobs, train_job
from collector.cli import main
from collector.db import classifiers
from collector.db import jobs as jobs_table
from protocol import routes
from protocol.wire import UploadItem

REPO = Path(__file__).resolve().parents[2]


def assert_error(resp, status: int) -> None:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.is_json and isinstance(resp.json.get("message"), str)


@pytest.fixture
def people(kit):
    """The kit's app holding separable Smiling items of 5 participants (10, 12, ..., 18 items)."""
    rng = np.random.default_rng(3)
    direction = rng.choice([-0.3, 0.3], size=(16, 8, 8)).astype(np.float32)
    for p in range(5):
        _, h = kit.register()
        items = []
        for i in range(10 + 2 * p):
            y = i % 2
            f = rng.standard_normal((16, 8, 8)).astype(np.float32) + (direction if y else -direction)
            items.append(UploadItem(f"p{p}-{i}", {"feature": f}, {"Smiling": y}))
        assert kit.upload(h, kit.body(items)).json["stored"] == len(items)
    return kit


def db_of(kit):
    return kit.app.extensions["pric"].db


def data_dir(kit) -> Path:
    return Path(kit.app.config["DATA_DIR"])


def job_rows(kit) -> int:
    with db_of(kit).read() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs_table)).scalar_one())


def classifier_rows(kit) -> int:
    with db_of(kit).read() as conn:
        return int(conn.execute(select(func.count()).select_from(classifiers)).scalar_one())


# --- the API ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_queues_a_job_that_a_worker_runs_and_the_api_reports(people):
    op = people.staff("operator")
    resp = people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op)
    assert resp.status_code == 202
    job_id = resp.json["job_id"]
    assert resp.json == {"job_id": job_id, "status": "queued", "status_url": routes.job_url(job_id)}
    assert resp.headers["Location"] == routes.job_url(job_id)
    queued = people.client.get(routes.job_url(job_id), headers=op).json
    assert (queued["status"], queued["attempts"], queued["result"], queued["started_at"]) == ("queued", 0, None, None)
    assert queued["params"] == {"task": "Smiling", "model_id": people.card.model_id, "kind": "logistic", "epochs": 300}
    assert "claim" not in queued  # the claim token stays with its worker
    # a retried request does not queue the same job twice
    assert people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op).json["job_id"] == job_id
    assert job_rows(people) == 1
    assert classifier_rows(people) == 0  # nothing trains in the serving process

    assert jobs.run_worker(db_of(people), data_dir(people), once=True) == (1, "done")
    done = people.client.get(routes.job_url(job_id), headers=op).json
    assert done["status"] == "done" and done["attempts"] == 1 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    result = done["result"]
    assert result["accuracy"] > result["majority_rate"] and result["split"] == "by participant"
    assert result["n_train_participants"] + result["n_test_participants"] == 5
    assert result["n_train"] + result["n_test"] == 10 + 12 + 14 + 16 + 18
    assert Path(result["classifier"]["path"]).is_file() and classifier_rows(people) == 1
    # once it ran, the same request queues a new job
    assert people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op).json["job_id"] != job_id
    assert jobs.run_worker(db_of(people), data_dir(people), once=True) == (1, "done")
    assert jobs.run_worker(db_of(people), data_dir(people), once=True) == (0, None)  # queue empty


def test_only_operators_see_jobs_and_bad_requests_queue_nothing(people):
    op = people.staff("operator")
    job_id = people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op).json["job_id"]
    _, participant = people.register()
    for headers in (participant, people.staff("auditor")):
        assert_error(people.client.get(routes.job_url(job_id), headers=headers), 403)
        assert_error(people.client.post(routes.TRAIN, json={"task": "Male"}, headers=headers), 403)
    assert_error(people.client.get(routes.job_url(job_id)), 401)
    for bad in ("999999", "abc", "1e3", "-1", "١", "9" * 40):
        assert_error(people.client.get(routes.job_url(bad), headers=op), 404)  # type: ignore[arg-type]
    for body in ({"task": "Smiling", "epochs": 0}, {"task": "Smiling", "epochs": True}, {"task": "Smiling", "x": 1},
                 {"task": "Smiling", "epochs": jobs.MAX_EPOCHS + 1}, {"task": "Smiling", "kind": "svm"}):
        assert_error(people.client.post(routes.TRAIN, json=body, headers=op), 400)
    assert_error(people.client.post(routes.TRAIN, json={"task": "Smiling", "model_id": "nope@1"}, headers=op), 404)
    assert job_rows(people) == 1


def test_pending_jobs_are_bounded(people, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_PENDING", 2)
    op = people.staff("operator")
    for epochs in (10, 11):
        assert people.client.post(routes.TRAIN, json={"task": "Smiling", "epochs": epochs}, headers=op).status_code == 202
    assert_error(people.client.post(routes.TRAIN, json={"task": "Smiling", "epochs": 12}, headers=op), 409)
    assert job_rows(people) == 2


@pytest.mark.slow
def test_the_serving_process_never_imports_torch(tmp_path, tiny_model_dir):
    code = f"""
import json, sys
from collector.app import create_app, issue_token
from protocol import routes
app = create_app({{"DATA_DIR": {str(tmp_path / 'd')!r}, "MODELS_DIR": {str(tiny_model_dir)!r}}})
client = app.test_client()
op = {{"Authorization": "Bearer " + issue_token(app, "operator")}}
resp = client.post(routes.TRAIN, json={{"task": "Smiling"}}, headers=op)
assert resp.status_code == 202, resp.json
assert client.get(resp.json["status_url"], headers=op).json["status"] == "queued"
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch")))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PRIC_TEST_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- claims, leases, retries --------------------------------------------------------------------

def test_a_worker_that_lost_its_lease_records_nothing(people):
    op = people.staff("operator")
    job_id = people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op).json["job_id"]
    db = db_of(people)
    first = jobs.claim_next(db, lease_s=60, worker="first")
    assert first is not None and first.attempt == 1
    assert jobs.claim_next(db, lease_s=60, worker="second") is None  # exclusive while the lease holds
    with db.write() as conn:  # the first worker stalls past its lease
        conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(lease_expires_at=time.time() - 1))
    second = jobs.claim_next(db, lease_s=60, worker="second")
    assert second is not None and second.job_id == job_id and second.attempt == 2
    assert jobs.run_claimed(db, first, data_dir(people)) == "lost"
    assert classifier_rows(people) == 0
    assert people.client.get(routes.job_url(job_id), headers=op).json["status"] == "running"
    assert jobs.run_claimed(db, second, data_dir(people)) == "done"
    job = people.client.get(routes.job_url(job_id), headers=op).json
    assert (job["status"], job["attempts"], job["worker"]) == ("done", 2, "second")
    assert classifier_rows(people) == 1  # one classifier, not two


def test_concurrent_claims_never_share_a_job(people):
    """Eight workers (threads, each its own connections) racing for twelve queued jobs:
    every job is claimed exactly once."""
    import threading

    op = people.staff("operator")
    queued = {people.client.post(routes.TRAIN, json={"task": "Smiling", "epochs": e}, headers=op).json["job_id"]
              for e in range(1, 13)}
    db, claims, lock = db_of(people), [], threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        while (claim := jobs.claim_next(db, lease_s=60, worker=f"w{n}")) is not None:
            with lock:
                claims.append(claim)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(c.job_id for c in claims) == sorted(queued)
    assert len({c.token for c in claims}) == 12 and all(c.attempt == 1 for c in claims)


def test_an_error_is_retried_then_fails_after_max_attempts(people, monkeypatch):
    op = people.staff("operator")
    calls = []

    def failing(*args, **kwargs):  # an unexpected error inside training (not the job's input)
        calls.append(1)
        raise OSError("No space left on device")

    monkeypatch.setattr(train_job, "fit_and_score", failing)
    job_id = people.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=op).json["job_id"]
    db = db_of(people)
    assert jobs.run_worker(db, data_dir(people), once=True, max_attempts=2) == (1, "queued")
    job = people.client.get(routes.job_url(job_id), headers=op).json
    assert job["status"] == "queued" and job["attempts"] == 1 and "attempt 1: OSError" in job["error"]
    assert jobs.run_worker(db, data_dir(people), once=True, max_attempts=2) == (1, "failed")
    job = people.client.get(routes.job_url(job_id), headers=op).json
    assert job["status"] == "failed" and job["attempts"] == 2 and "\n" not in job["error"]
    assert len(calls) == 2 and classifier_rows(people) == 0
    assert jobs.run_worker(db, data_dir(people), once=True) == (0, None)  # failed stays failed


def _worker(kit, db_args, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "collector.cli", "worker", "--data-dir", str(data_dir(kit)),
                             "--poll", "0.1", *db_args(str(data_dir(kit))), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(kit, job_id: int, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get_job(db_of(kit), job_id)
        if pred(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state: {jobs.get_job(db_of(kit), job_id)}")


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_retried_by_another_then_failed_never_stuck(people, db_args):
    """SIGKILL: no heartbeat any more; after the lease the next worker retries the job, and
    once the last allowed attempt's worker is killed too, the job fails."""
    op = people.staff("operator")
    # a long fit (minutes): the workers are killed while it runs
    job_id = people.client.post(routes.TRAIN, json={"task": "Smiling", "epochs": jobs.MAX_EPOCHS},
                                headers=op).json["job_id"]
    for attempt in (1, 2):
        proc = _worker(people, db_args, "--lease", "3", "--max-attempts", "2")
        try:
            job = _wait_for(people, job_id, lambda j: j["status"] == "running" and j["attempts"] == attempt
                            and j["worker"].endswith(f":{proc.pid}"))
            time.sleep(0.5)  # inside the job (loading, importing torch, fitting)
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # the dead worker's lease still holds: nobody else takes the job meanwhile
        assert jobs.claim_next(db_of(people), lease_s=3, max_attempts=2, worker="test") is None
        assert jobs.get_job(db_of(people), job_id)["status"] == "running"
        time.sleep(max(0.0, job["lease_expires_at"] - time.time()) + 1.5)
    # the second attempt's worker died too: the next look at the queue fails the job
    assert jobs.claim_next(db_of(people), lease_s=3, max_attempts=2, worker="test") is None
    job = jobs.get_job(db_of(people), job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"].startswith("attempt 2 of 2: worker") and "lease expired" in job["error"]
    assert classifier_rows(people) == 0


@pytest.mark.slow
def test_sigterm_stops_a_worker_cleanly_and_requeues_its_job(people, db_args):
    op = people.staff("operator")
    proc = _worker(people, db_args, "--lease", "30")
    try:
        time.sleep(1.0)  # idle, polling
        job_id = people.client.post(routes.TRAIN, json={"task": "Smiling", "epochs": jobs.MAX_EPOCHS},
                                    headers=op).json["job_id"]
        _wait_for(people, job_id, lambda j: j["status"] == "running")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    job = jobs.get_job(db_of(people), job_id)
    assert (job["status"], job["attempts"], job["lease_expires_at"]) == ("queued", 0, None)  # not counted
    assert '"event": "job_queued"' in err
    assert classifier_rows(people) == 0


def test_cli_train_is_a_job_run_in_process(people, capsys, db_args):
    d = str(data_dir(people))
    assert main(["train", "--task", "Smiling", "--data-dir", d, "--json", *db_args(d)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["jobs", "list", "--json", "--data-dir", d, *db_args(d)]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert (job["status"], job["attempts"], job["result"]) == ("done", 1, result)
    assert main(["jobs", "show", "99", "--data-dir", d, *db_args(d)]) == 7
    assert main(["worker", "--once", "--lease", "1", "--data-dir", d, *db_args(d)]) == 2
    assert "--lease 1" in capsys.readouterr().err


# --- issue 14: held out by participant ------------------------------------------------------------

def test_held_out_is_a_set_of_participants_deterministic_and_reported(people):
    data = train_job.load_labelled(db_of(people), people.card.model_id, "Smiling")
    test_side = set(data.owners[data.is_test])
    train_side = set(data.owners[~data.is_test])
    assert test_side and train_side and not test_side & train_side  # no participant on both sides
    assert test_side == data.held_out and len(test_side) == 1  # 20% of 5
    again = train_job.load_labelled(db_of(people), people.card.model_id, "Smiling")
    assert again.held_out == data.held_out and (again.is_test == data.is_test).all()
    # the choice depends on who, not on the order of uploads or the other participants' items
    counts = {p: int((data.owners == p).sum()) for p in data.participants}
    assert train_job.held_out_participants(dict(reversed(list(counts.items())))) == data.held_out


def test_held_out_participants_edge_cases():
    assert train_job.held_out_participants({"only": 100}) == set()  # never everyone
    two = train_job.held_out_participants({"a": 5, "b": 5})
    assert len(two) == 1
    many = {f"p{i}": 1 for i in range(20)}
    chosen = train_job.held_out_participants(many)
    assert len(chosen) == 4  # 20% of 20; each holds 1 item, MIN_TEST is met by then
    few_items = {f"p{i}": 1 for i in range(3)}
    assert len(train_job.held_out_participants(few_items)) == 2  # more until MIN_TEST items, one stays
