"""Jobs: work the serving process queues and `pric-collector worker` processes run.

The queue is the `jobs` table of the collector's database (revision 0002), so it needs
nothing beside the database, works on SQLite and PostgreSQL alike, and several workers
(on one machine, or on several with PostgreSQL) may serve it. A job goes
queued -> running -> done | failed:

- A worker claims the oldest claimable job in one write transaction (SQLite: BEGIN
  IMMEDIATE; PostgreSQL: the write advisory lock, and SELECT ... FOR UPDATE SKIP LOCKED),
  so two workers never claim the same job. A claim is a random token: only its holder may
  finish the job, and it holds a lease that a heartbeat thread extends.
- A worker that dies mid-job (SIGKILL, power cut) stops renewing its lease; once the lease
  has expired the job is claimable again, and after `max_attempts` claims it is failed,
  never stuck. A job's result (the classifier row) is written in the same transaction that
  marks it done, and only while the claim still holds, so a worker that lost its lease
  cannot add a second classifier.
- A job whose input is wrong (too few items, an unknown model: a PricError) fails at once;
  any other error is retried on the next claim, up to `max_attempts`.
- SIGTERM stops a worker cleanly: training stops between epochs and the job goes back to
  the queue without counting the interrupted attempt.

The serving process only queues and reads jobs: this module imports no torch (training
imports it inside the worker).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from collector.db import Database, jobs
from collector.registry import recorded_card
from protocol.errors import ConflictError, InvalidInputError, NotFoundError, PricError
from protocol.wire import LABEL_NAME_RE

log = logging.getLogger("collector.jobs")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATUSES = (QUEUED, RUNNING, DONE, FAILED)
KINDS = ("train",)
TRAIN_KINDS = ("logistic", "mlp")
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_POLL_S = 1.0
MAX_PENDING = 100  # queued + running jobs at once; more are refused (409) until some finish
MAX_EPOCHS = 100_000
MAX_ERROR_CHARS = 500


def train_params(body: dict[str, Any], default_model: Callable[[], str]) -> dict[str, Any]:
    """A train job's parameters from an untrusted object (a request body, or a stored row
    read back by a worker); InvalidInputError names what is wrong."""
    task = body.get("task")
    if not isinstance(task, str) or not LABEL_NAME_RE.match(task):
        raise InvalidInputError("task must be a label name such as 'Smiling'")
    model_id = body.get("model_id", None)
    if model_id is None:
        model_id = default_model()
    if not isinstance(model_id, str) or not model_id:
        raise InvalidInputError("model_id must be a non-empty string (leave it out for the current model)")
    kind = body.get("kind", "logistic")
    if kind not in TRAIN_KINDS:
        raise InvalidInputError("kind must be 'logistic' or 'mlp'")
    epochs = body.get("epochs", 300)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= MAX_EPOCHS:
        raise InvalidInputError(f"epochs must be an integer between 1 and {MAX_EPOCHS}")
    unknown = set(body) - {"task", "model_id", "kind", "epochs"}
    if unknown:
        raise InvalidInputError(f"unknown train parameter(s): {', '.join(sorted(map(str, unknown)))[:200]}")
    return {"task": task, "model_id": model_id, "kind": kind, "epochs": epochs}


def _params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def enqueue(db: Database, kind: str, params: dict[str, Any]) -> tuple[int, bool]:
    """Queue a job; (id, True). The same job still queued (a retried request) is not queued
    twice: (its id, False). ConflictError when MAX_PENDING jobs are queued or running."""
    assert kind in KINDS
    text = _params_json(params)
    with db.write() as conn:
        same = conn.execute(select(jobs.c.id).where(jobs.c.status == QUEUED, jobs.c.kind == kind,
                                                    jobs.c.params == text).order_by(jobs.c.id).limit(1)).first()
        if same is not None:
            return int(same[0]), False
        pending = conn.execute(select(func.count()).select_from(jobs)
                               .where(jobs.c.status.in_((QUEUED, RUNNING)))).scalar_one()
        if pending >= MAX_PENDING:
            raise ConflictError(f"{pending} jobs are queued or running, the most the collector keeps; "
                                "try again when some have finished (is a `pric-collector worker` running?)")
        job_id = conn.execute(jobs.insert().values(kind=kind, params=text, status=QUEUED, attempts=0,
                                                   created_at=time.time())).inserted_primary_key[0]
    return int(job_id), True


def job_dict(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "id": int(m["id"]), "kind": m["kind"], "status": m["status"], "params": json.loads(m["params"]),
        "attempts": int(m["attempts"]), "created_at": m["created_at"], "started_at": m["started_at"],
        "finished_at": m["finished_at"], "heartbeat_at": m["heartbeat_at"], "lease_expires_at": m["lease_expires_at"],
        "worker": m["worker"], "result": json.loads(m["result"]) if m["result"] is not None else None,
        "error": m["error"],
    }


_PUBLIC = [c for c in jobs.c if c.name != "claim"]  # the claim token stays with its worker


def get_job(db: Database, job_id: int) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(select(*_PUBLIC).where(jobs.c.id == job_id)).first()
    if row is None:
        raise NotFoundError(f"job {job_id}: no such job")
    return job_dict(row)


def list_jobs(db: Database, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first."""
    query = select(*_PUBLIC).order_by(jobs.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(jobs.c.status == status)
    with db.read() as conn:
        return [job_dict(r) for r in conn.execute(query)]


@dataclass(frozen=True)
class Claim:
    job_id: int
    token: str
    kind: str
    params: dict[str, Any]
    attempt: int


def worker_name() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


def _claimable(now: float):  # noqa: ANN202 - a SQL expression
    return or_(jobs.c.status == QUEUED, and_(jobs.c.status == RUNNING, jobs.c.lease_expires_at < now))


def claim_next(db: Database, lease_s: float = DEFAULT_LEASE_S, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
               worker: str | None = None) -> Claim | None:
    """Claim the oldest queued job, or a running one whose lease expired; None if none.
    A job whose lease expired after its last allowed attempt is failed here."""
    with db.read() as conn:  # idle workers poll with reads: no write (and no commit counted) per poll
        if conn.execute(select(jobs.c.id).where(_claimable(time.time())).limit(1)).first() is None:
            return None
    with db.write() as conn:
        while True:
            now = time.time()
            query = select(jobs.c.id, jobs.c.kind, jobs.c.params, jobs.c.status, jobs.c.attempts, jobs.c.worker) \
                .where(_claimable(now)).order_by(jobs.c.id).limit(1)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            row = conn.execute(query).first()
            if row is None:
                return None
            if row.status == RUNNING and row.attempts >= max_attempts:
                conn.execute(update(jobs).where(jobs.c.id == row.id).values(
                    status=FAILED, finished_at=now, claim=None, lease_expires_at=None,
                    error=f"attempt {row.attempts} of {max_attempts}: worker {row.worker} stopped responding "
                          f"(its lease expired); not retried"))
                log.warning(json.dumps({"event": "job_failed", "job": int(row.id), "reason": "lease expired",
                                        "attempts": int(row.attempts)}))
                continue
            token = secrets.token_hex(16)
            conn.execute(update(jobs).where(jobs.c.id == row.id).values(
                status=RUNNING, attempts=row.attempts + 1, started_at=now, heartbeat_at=now,
                lease_expires_at=now + lease_s, claim=token, worker=(worker or worker_name())[:128]))
            return Claim(job_id=int(row.id), token=token, kind=row.kind, params=json.loads(row.params),
                         attempt=int(row.attempts) + 1)


def enqueue_claimed(db: Database, kind: str, params: dict[str, Any], lease_s: float = DEFAULT_LEASE_S) -> Claim:
    """Queue a job already claimed by this process (`pric-collector train` runs it itself)."""
    token, now = secrets.token_hex(16), time.time()
    with db.write() as conn:
        job_id = conn.execute(jobs.insert().values(
            kind=kind, params=_params_json(params), status=RUNNING, attempts=1, created_at=now, started_at=now,
            heartbeat_at=now, lease_expires_at=now + lease_s, claim=token, worker=worker_name()[:128],
        )).inserted_primary_key[0]
    return Claim(job_id=int(job_id), token=token, kind=kind, params=params, attempt=1)


def _held(claim: Claim):  # noqa: ANN202 - a SQL expression
    return and_(jobs.c.id == claim.job_id, jobs.c.claim == claim.token, jobs.c.status == RUNNING)


def heartbeat(db: Database, claim: Claim, lease_s: float) -> bool:
    """Extend the lease; False when the claim no longer holds (the lease expired and
    another worker took the job, or it was failed)."""
    now = time.time()
    with db.write() as conn:
        return conn.execute(update(jobs).where(_held(claim)).values(
            heartbeat_at=now, lease_expires_at=now + lease_s)).rowcount == 1


def holds(conn: Connection, claim: Claim) -> bool:
    return conn.execute(select(jobs.c.id).where(_held(claim))).first() is not None


def mark_done(conn: Connection, claim: Claim, result: dict[str, Any]) -> bool:
    """In the caller's transaction (the one that records the job's output)."""
    return conn.execute(update(jobs).where(_held(claim)).values(
        status=DONE, finished_at=time.time(), result=json.dumps(result, sort_keys=True), error=None, claim=None,
        lease_expires_at=None)).rowcount == 1


def _one_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, PricError) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:MAX_ERROR_CHARS]


def mark_failed(db: Database, claim: Claim, error: str, retry: bool) -> str:
    """Failed for good, or (retry) back to the queue with the error kept; the new status."""
    status = QUEUED if retry else FAILED
    with db.write() as conn:
        conn.execute(update(jobs).where(_held(claim)).values(
            status=status, finished_at=None if retry else time.time(), error=error, claim=None,
            lease_expires_at=None))
    return status


def release(db: Database, claim: Claim) -> None:
    """Back to the queue, the interrupted attempt not counted (a worker stopping cleanly)."""
    with db.write() as conn:
        conn.execute(update(jobs).where(_held(claim)).values(
            status=QUEUED, attempts=jobs.c.attempts - 1, claim=None, lease_expires_at=None))


class LeaseLost(Exception):
    """The claim no longer holds: another worker has the job; this attempt's work is dropped."""


class _Heartbeat:
    """Renews a claim's lease every lease/3 seconds in a thread, until stopped."""

    def __init__(self, db: Database, claim: Claim, lease_s: float) -> None:
        self.db, self.claim, self.lease_s = db, claim, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{claim.job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not heartbeat(self.db, self.claim, self.lease_s):
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - a missed beat; the lease has slack for two more
                log.warning(json.dumps({"event": "heartbeat_failed", "job": self.claim.job_id,
                                        "reason": _one_line(exc)}))


def run_claimed(db: Database, claim: Claim, data_dir: Path, lease_s: float = DEFAULT_LEASE_S,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, stop: threading.Event | None = None,
                reraise: bool = False) -> str:
    """Run a claimed job to its end; the job's new status (done, failed, "lost", or queued
    when it will be retried or was interrupted by `stop`). The error is stored on the job;
    with `reraise` a PricError (wrong input) is also raised once stored."""
    stop = stop or threading.Event()
    started = time.monotonic()
    with _Heartbeat(db, claim, lease_s) as beat:
        try:
            result = _execute(db, claim, data_dir, should_stop=lambda: stop.is_set() or beat.lost.is_set())
        except LeaseLost:
            status = "lost"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            from collector.train_job import Interrupted

            if isinstance(exc, Interrupted) and beat.lost.is_set():
                status = "lost"
            elif isinstance(exc, Interrupted):
                release(db, claim)
                status = QUEUED
            else:
                permanent = isinstance(exc, PricError) or claim.attempt >= max_attempts
                status = mark_failed(db, claim, f"attempt {claim.attempt}: {_one_line(exc)}"
                                     if not isinstance(exc, PricError) else _one_line(exc), retry=not permanent)
                if not isinstance(exc, PricError):
                    log.exception("job %d attempt %d failed", claim.job_id, claim.attempt)
                elif reraise:
                    raise
        else:
            status = DONE
    log.info(json.dumps({"event": f"job_{status}", "job": claim.job_id, "kind": claim.kind,
                         "attempt": claim.attempt, "seconds": round(time.monotonic() - started, 3)}))
    return status


def _execute(db: Database, claim: Claim, data_dir: Path, should_stop: Callable[[], bool]) -> dict[str, Any]:
    if claim.kind != "train":
        raise InvalidInputError(f"job kind {claim.kind!r} is not one this worker runs ({', '.join(KINDS)})")
    from collector.train_job import TrainConfig, fit_classifier, record_classifier

    params = train_params(claim.params, default_model=lambda: "")  # stored rows are checked like requests
    recorded_card(db, params["model_id"])  # NotFoundError for a model gone since
    trained = fit_classifier(db, params["model_id"], params["task"],
                             TrainConfig(kind=params["kind"], epochs=params["epochs"]), should_stop=should_stop)
    with db.write() as conn:  # the classifier and "done" together, only while the claim holds
        if not holds(conn, claim):
            raise LeaseLost(f"job {claim.job_id}: lease lost")
        result = record_classifier(conn, trained, out_dir=data_dir / "classifiers")
        mark_done(conn, claim, result)
    return result


def run_worker(db: Database, data_dir: Path, once: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
               lease_s: float = DEFAULT_LEASE_S, poll_s: float = DEFAULT_POLL_S,
               stop: threading.Event | None = None) -> tuple[int, str | None]:
    """Claim and run jobs until `stop` is set (or, with `once`, one job, or none when the
    queue is empty). Returns (jobs run, status of the last one)."""
    stop = stop or threading.Event()
    name = worker_name()
    ran, last = 0, None
    while not stop.is_set():
        claim = claim_next(db, lease_s=lease_s, max_attempts=max_attempts, worker=name)
        if claim is None:
            if once:
                break
            stop.wait(poll_s)
            continue
        log.info(json.dumps({"event": "job_claimed", "job": claim.job_id, "kind": claim.kind,
                             "attempt": claim.attempt}))
        last = run_claimed(db, claim, data_dir, lease_s=lease_s, max_attempts=max_attempts, stop=stop)
        ran += 1
        if once:
            break
    return ran, last
