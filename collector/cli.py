"""`pric-collector`: run the collector and administer its data folder.

    pric-collector serve --data-dir DIR --models-dir exported_models [--host 127.0.0.1] [--port 8080]
                         [--workers N --threads T] [--rate-limit-storage URI] [--auditor-keys DIR] [--allow-unattested]
    pric-collector token create --role operator|auditor --data-dir DIR
    pric-collector stats --data-dir DIR [--json]
    pric-collector train --task Smiling --data-dir DIR [--model-id ID] [--kind logistic|mlp] [--json]
    pric-collector model list|retire MODEL_ID|activate MODEL_ID --data-dir DIR [--models-dir DIR]
    pric-collector backup --data-dir DIR --out FILE
    pric-collector invite create --data-dir DIR [--count N]
    pric-collector token revoke --data-dir DIR (--participant ID_OR_PSEUDONYM | --token-file FILE|-)
    pric-collector db upgrade|current --data-dir DIR [--no-backup]
    pric-collector worker --data-dir DIR [--once] [--max-attempts 3] [--lease 60] [--poll 1]
    pric-collector jobs list|show ID --data-dir DIR [--json]

Every command takes `--database-url` (e.g. postgresql+psycopg://user@host/pric) instead of
the SQLite file under `--data-dir`. stats, train, token and model work on the database
directly, with or without a running server.

Exit codes: 0 ok; 1 other error; 2 bad argument or input; 3 invalid payload; 4 unknown
or damaged model; 6 forbidden; 7 not found; 9 database or rate-limit storage unreachable; 10 the database holds
less than the collector acknowledged (lost or damaged WAL): restore a backup; 13 the
database's schema is older than this release's (run `pric-collector db upgrade`) or newer;
14 a schema migration failed (rolled back: the database is as it was). `worker --once`
exits 1 when the job it ran failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from collector.registry import TRUSTED_AUDITORS_DIR
from protocol.errors import InvalidInputError, NotFoundError, PricError
from protocol.routes import DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_ITEMS, MAX_BODY_BYTES, MAX_JSON_BODY_BYTES

EXIT_DB = 9


@dataclass(frozen=True)
class ServeConfig:
    data_dir: str
    models_dir: str
    host: str
    port: int
    threads: int
    workers: int
    database_url: str | None
    rate_limit_per_min: float
    read_limit_per_min: float
    register_limit_per_min: float
    registration: str
    enrolment_secret_set: bool
    quota_items: int
    quota_bytes: int
    json_body_limit: int
    labels: list[str] | None
    current_model: str | None
    auditor_keys: str | None
    trusted_auditors: list[str]
    allow_unattested: bool
    rate_limit_storage: str  # password masked


ENROLMENT_SECRET_ENV = "PRIC_ENROLMENT_SECRET"
RATE_LIMIT_STORAGE_ENV = "PRIC_RATE_LIMIT_STORAGE"  # collector.limits.STORAGE_ENV


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (also in subcommands, which take this class): a mistyped
    `--enrolment-secret VALUE` must not be read as `--enrolment-secret-file VALUE`."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pric-collector", description="PRIC collector server and administration.")
    sub = p.add_subparsers(dest="command", required=True)

    def storage(sp: argparse.ArgumentParser, models: bool = False) -> None:
        sp.add_argument("--data-dir", required=True, help="collector data folder (SQLite file, classifiers)")
        sp.add_argument("--database-url", default=None, help="SQLAlchemy URL, e.g. PostgreSQL (default: SQLite in --data-dir)")
        if models:
            sp.add_argument("--models-dir", default="exported_models", help="folder of <name>/model_card.json")
            sp.add_argument("--auditor-keys", default=None,
                            help="folder of trusted auditors' public key files (*.json); a model is published only "
                                 f"with an attestation signed by one of them (default: <models-dir>/"
                                 f"{TRUSTED_AUDITORS_DIR} if it exists, else none)")
            sp.add_argument("--allow-unattested", action="store_true",
                            help="also publish models without a valid attestation (each logged as a warning)")

    s = sub.add_parser("serve", help="serve the HTTP API on gunicorn (gthread workers)")
    storage(s, models=True)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    s.add_argument("--threads", type=int, default=8, help="threads per worker process")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (Python runs one core per process); more than one "
                        "needs a shared --rate-limit-storage (Redis) unless every rate limit is 0")
    s.add_argument("--timeout", type=int, default=60,
                   help="seconds a worker may stay silent before the master restarts it")
    s.add_argument("--graceful-timeout", type=int, default=30,
                   help="seconds requests in flight get to finish on stop, reload or recycling")
    s.add_argument("--keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    s.add_argument("--max-requests", type=int, default=10_000,
                   help="recycle a worker after this many requests (0: never)")
    s.add_argument("--max-requests-jitter", type=int, default=1_000,
                   help="up to this many more requests, drawn per worker, so that workers do not restart together")
    s.add_argument("--rate-limit", type=float, default=600, help="uploads per minute per token (0: off)")
    s.add_argument("--json-body-limit", type=int, default=None,
                   help="largest JSON upload body in bytes (0: JSON uploads off; default %d); the client sends "
                        "the binary format" % MAX_JSON_BODY_BYTES)
    s.add_argument("--read-rate-limit", type=float, default=600, help="GET requests per minute per token (0: off)")
    s.add_argument("--register-rate-limit", type=float, default=120,
                   help="registrations per minute per client address (0: off)")
    s.add_argument("--rate-limit-storage", default=None, metavar="URI",
                   help=f"where rate-limit counts live: memory:// (one worker process; the default) or "
                        f"redis://[:PASSWORD@]HOST:PORT/DB, shared by all workers and hosts (or set ${RATE_LIMIT_STORAGE_ENV}; "
                        "a password is never printed)")
    s.add_argument("--registration", choices=["open", "invite", "closed"], default=None,
                   help="who may register: open (anyone; the default on a loopback --host without an enrolment "
                        "secret), invite (an invite code or the enrolment secret; the default otherwise), "
                        "closed (an operator token only)")
    s.add_argument("--closed-registration", action="store_true", help="same as --registration closed")
    s.add_argument("--enrolment-secret-file", default=None,
                   help=f"file whose first line is the enrolment secret (or set ${ENROLMENT_SECRET_ENV}); "
                        "never on the command line")
    s.add_argument("--quota-items", type=int, default=None,
                   help="items each participant may store per model (0: no limit; default %d)" % DEFAULT_QUOTA_ITEMS)
    s.add_argument("--quota-bytes", type=int, default=None,
                   help="bytes of arrays each participant may store per model (0: no limit; default %d)"
                        % DEFAULT_QUOTA_BYTES)
    s.add_argument("--labels", default=None,
                   help="comma-separated label names uploads may carry (default: each model card's tasks, "
                        "else the 40 CelebA attributes)")
    s.add_argument("--labels-file", default=None, help="label names, one per line or comma-separated")
    s.add_argument("--current-model", default=None, help="model id served as current (default: newest active)")
    s.add_argument("--quiet", action="store_true", help="no per-request log lines")

    t = sub.add_parser("token", help="staff tokens; revoke any token")
    tsub = t.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="create an operator or auditor token (printed once)")
    tc.add_argument("--role", required=True, choices=["operator", "auditor"])
    storage(tc)
    tr_ = tsub.add_parser("revoke", help="revoke a token, or every token of a participant")
    who = tr_.add_mutually_exclusive_group(required=True)
    who.add_argument("--participant", help="participant id or pseudonym (as in logs and exports)")
    who.add_argument("--token-file", help="file holding the token to revoke ('-': standard input)")
    storage(tr_)

    inv = sub.add_parser("invite", help="one-time registration codes")
    isub = inv.add_subparsers(dest="invite_command", required=True)
    ic = isub.add_parser("create", help="create invite codes (printed once, one a line; stored hashed)")
    ic.add_argument("--count", type=int, default=1)
    storage(ic)

    st = sub.add_parser("stats", help="participants, items, labels and classifiers")
    storage(st)
    st.add_argument("--json", action="store_true")

    tr = sub.add_parser("train", help="train a classifier for a task on the stored features of one model")
    storage(tr)
    tr.add_argument("--task", required=True)
    tr.add_argument("--model-id", default=None, help="default: newest active model")
    tr.add_argument("--kind", choices=["logistic", "mlp"], default="logistic")
    tr.add_argument("--epochs", type=int, default=300)
    tr.add_argument("--json", action="store_true")

    w = sub.add_parser("worker", help="run queued jobs (POST /train) until SIGTERM; several may run at once")
    storage(w)
    w.add_argument("--once", action="store_true", help="run one job (none if the queue is empty), then exit")
    w.add_argument("--max-attempts", type=int, default=3,
                   help="claims of a job before it is failed (a killed worker's claim counts)")
    w.add_argument("--lease", type=float, default=60.0,
                   help="seconds a claim holds without a heartbeat (sent every lease/3); then the job is retried")
    w.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    w.add_argument("--quiet", action="store_true", help="no per-job log lines")

    j = sub.add_parser("jobs", help="queued, running and finished jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list", help="newest first")
    storage(jl)
    jl.add_argument("--status", choices=["queued", "running", "done", "failed"], default=None)
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--json", action="store_true")
    js = jsub.add_parser("show", help="one job: status, attempts, times, result or error")
    js.add_argument("job_id", type=int)
    storage(js)
    js.add_argument("--json", action="store_true")

    b = sub.add_parser("backup", help="a consistent copy of the SQLite database, taken while the server runs")
    storage(b)
    b.add_argument("--out", required=True, help="backup file to create (must not exist)")

    d = sub.add_parser("db", help="the database schema: show its revision, upgrade it")
    dsub = d.add_subparsers(dest="db_command", required=True)
    du = dsub.add_parser("upgrade", help="migrate the database to this release's schema (a SQLite file is first "
                                         "backed up next to itself)")
    storage(du)
    du.add_argument("--no-backup", action="store_true", help="SQLite: skip the copy taken before migrating")
    dc = dsub.add_parser("current", help="print the database's schema revision and this release's")
    storage(dc)

    m = sub.add_parser("model", help="list, retire or reactivate models")
    msub = m.add_subparsers(dest="model_command", required=True)
    ml = msub.add_parser("list")
    storage(ml, models=True)
    ml.add_argument("--json", action="store_true")
    for name in ("retire", "activate"):
        mr = msub.add_parser(name)
        mr.add_argument("model_id")
        storage(mr, models=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _dispatch(args)
    except PricError as exc:
        print(f"pric-collector: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except SQLAlchemyError as exc:
        print(f"pric-collector: error: database {_redact(args)}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
        return EXIT_DB
    except OSError as exc:
        print(f"pric-collector: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _redact(args: argparse.Namespace) -> str:
    url = getattr(args, "database_url", None)
    if not url:
        return str(Path(args.data_dir) / "collector.sqlite3")
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _database(args: argparse.Namespace):
    from collector.db import DB_FILE, Database, default_database_url

    if args.command in ("stats", "train", "db", "jobs", "worker") and not args.database_url \
            and not (Path(args.data_dir) / DB_FILE).is_file():
        raise NotFoundError(f"{args.data_dir}: no collector database here (start `pric-collector serve` on it first)")
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    db = Database(args.database_url or default_database_url(args.data_dir))
    try:
        # backup and db work on any schema revision (a backup before upgrading); the rest need the current one
        db.prepare("any" if args.command in ("backup", "db") else "serve")
    except BaseException:
        db.dispose(checkpoint=False)
        raise
    return db


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "backup" and args.database_url and not args.database_url.startswith("sqlite"):
        from collector.store import PG_BACKUP_ADVICE

        raise InvalidInputError(PG_BACKUP_ADVICE)  # before connecting: the advice needs no database
    db = _database(args)
    try:
        if args.command == "token":
            return _token(db, args)
        if args.command == "invite":
            from collector.auth import create_invites

            if not 1 <= args.count <= 10_000:
                raise InvalidInputError(f"--count {args.count}: must be between 1 and 10000")
            print("\n".join(create_invites(db, args.count)))
            return 0
        if args.command == "stats":
            from collector.store import stats

            _print_stats(stats(db), args.json)
            return 0
        if args.command == "train":
            return _train(db, args)
        if args.command == "model":
            return _model(db, args)
        if args.command == "backup":
            return _backup(db, args)
        if args.command == "db":
            return _db(db, args)
        if args.command == "worker":
            return _worker(db, args)
        if args.command == "jobs":
            return _jobs(db, args)
    finally:
        db.dispose()
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from collector.app import create_app
    from collector.gunicorn_conf import CollectorServer, ServerOptions, listen
    from collector.limits import check_storage, masked_uri

    for flag, value, lo, hi in (("--workers", args.workers, 1, 64), ("--threads", args.threads, 1, 256),
                                ("--timeout", args.timeout, 1, 3600), ("--graceful-timeout", args.graceful_timeout, 1, 3600),
                                ("--keep-alive", args.keep_alive, 0, 600),
                                ("--max-requests", args.max_requests, 0, 10**9),
                                ("--max-requests-jitter", args.max_requests_jitter, 0, 10**9)):
        if not lo <= value <= hi:
            raise InvalidInputError(f"{flag} {value}: must be between {lo} and {hi}")
    if not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port {args.port}: must be between 0 (any free port) and 65535")
    if not 0 <= args.rate_limit < float("inf"):  # also refuses nan
        raise InvalidInputError(f"--rate-limit {args.rate_limit}: must be a number of uploads per minute, 0 for none")
    if not 0 <= args.read_rate_limit < float("inf"):
        raise InvalidInputError(f"--read-rate-limit {args.read_rate_limit}: must be a number of requests per minute, "
                                "0 for none")
    if not 0 <= args.register_rate_limit < float("inf"):
        raise InvalidInputError(f"--register-rate-limit {args.register_rate_limit}: must be a number of registrations "
                                "per minute, 0 for none")
    storage = _rate_limit_storage(args)
    secret = _enrolment_secret(args)
    registration = registration_mode(args, secret)
    quota_items = DEFAULT_QUOTA_ITEMS if args.quota_items is None else args.quota_items
    quota_bytes = DEFAULT_QUOTA_BYTES if args.quota_bytes is None else args.quota_bytes
    for flag, value in (("--quota-items", quota_items), ("--quota-bytes", quota_bytes)):
        if value < 0:
            raise InvalidInputError(f"{flag} {value}: must be 0 (no limit) or more")
    json_limit = MAX_JSON_BODY_BYTES if args.json_body_limit is None else args.json_body_limit
    if not 0 <= json_limit <= MAX_BODY_BYTES:
        raise InvalidInputError(f"--json-body-limit {json_limit}: must be between 0 (JSON uploads off) and {MAX_BODY_BYTES}")
    auditor_keys, trusted = _auditor_keys(args)
    cfg = ServeConfig(
        data_dir=args.data_dir, models_dir=args.models_dir, host=args.host, port=args.port, threads=args.threads,
        workers=args.workers, database_url=args.database_url, rate_limit_per_min=args.rate_limit,
        read_limit_per_min=args.read_rate_limit, register_limit_per_min=args.register_rate_limit,
        registration=registration, enrolment_secret_set=secret is not None,
        quota_items=quota_items, quota_bytes=quota_bytes, json_body_limit=json_limit, labels=_labels(args), current_model=args.current_model,
        auditor_keys=auditor_keys, trusted_auditors=[f"{k.keyid[:16]} {k.name}".strip() for k in trusted.values()],
        allow_unattested=args.allow_unattested, rate_limit_storage=masked_uri(storage),
    )
    check_storage(storage)  # before the database: one line, the password masked
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    config = {
        "DATA_DIR": cfg.data_dir, "MODELS_DIR": cfg.models_dir, "DATABASE_URL": cfg.database_url,
        "RATE_LIMIT_PER_MIN": cfg.rate_limit_per_min, "READ_LIMIT_PER_MIN": cfg.read_limit_per_min,
        "REGISTER_LIMIT_PER_MIN": cfg.register_limit_per_min, "REGISTRATION": cfg.registration, "ENROLMENT_SECRET": secret, "QUOTA_ITEMS": cfg.quota_items,
        "QUOTA_BYTES": cfg.quota_bytes, "JSON_BODY_LIMIT": cfg.json_body_limit, "LABELS": cfg.labels, "CURRENT_MODEL": cfg.current_model,
        "AUDITOR_KEYS": cfg.auditor_keys, "ALLOW_UNATTESTED": cfg.allow_unattested, "RATE_LIMIT_STORAGE": storage,
    }

    def check() -> list[str]:
        """Build the app once in the master (creates the tables, checks models and keys) and
        let it go: workers build their own after the fork."""
        app = create_app(config)
        try:
            return app.extensions["pric"].registry.active_ids()
        finally:
            app.extensions["pric"].db.dispose()

    models = check()
    saved = asdict(cfg)
    if saved["database_url"]:
        saved["database_url"] = _redact(args)
    (Path(cfg.data_dir) / "serve_config.json").write_text(json.dumps(saved, indent=2) + "\n")
    try:
        sock = listen(cfg.host, cfg.port)
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise InvalidInputError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({reason})") from None
    options = ServerOptions(workers=cfg.workers, threads=cfg.threads, timeout_s=args.timeout,
                            graceful_timeout_s=args.graceful_timeout, keepalive_s=args.keep_alive,
                            max_requests=args.max_requests, max_requests_jitter=args.max_requests_jitter,
                            quiet=args.quiet)
    server = CollectorServer(lambda: create_app(config), sock, options, on_reload=check)
    # the line collector.launch (and operators' scripts) wait for: the socket listens from here on
    print(f"pric-collector: serving on http://{cfg.host}:{sock.getsockname()[1]} "
          f"(data {cfg.data_dir}, models {', '.join(models) or 'none'}"
          f"{f', {cfg.workers} workers' if cfg.workers > 1 else ''}, registration {cfg.registration}, "
          f"rate limits in {cfg.rate_limit_storage}"
          f"{', UNATTESTED MODELS ALLOWED' if cfg.allow_unattested else ''})", flush=True)
    try:
        status = server.run()
    finally:
        sock.close()
    if status != 0:
        print(f"pric-collector: error: the server stopped with status {status} (workers failed to start or "
              "kept failing; see the log above)", file=sys.stderr)
        return 1
    return 0


def _rate_limit_storage(args: argparse.Namespace) -> str:
    """--rate-limit-storage, else $PRIC_RATE_LIMIT_STORAGE, else memory://; with several
    workers and any rate limit on, a storage they share."""
    from collector.limits import DEFAULT_STORAGE, is_shared, masked_uri

    uri = args.rate_limit_storage or os.environ.get(RATE_LIMIT_STORAGE_ENV, "").strip() or DEFAULT_STORAGE
    limited = any(rate > 0 for rate in (args.rate_limit, args.read_rate_limit, args.register_rate_limit))
    if args.workers > 1 and limited and not is_shared(uri):
        raise InvalidInputError(
            f"--workers {args.workers} with rate-limit storage {masked_uri(uri)}: each worker process would count "
            "on its own, letting through up to that many times each limit; give a storage they share "
            f"(--rate-limit-storage redis://HOST:6379/0 or ${RATE_LIMIT_STORAGE_ENV}), or use --workers 1 with "
            "more --threads, or set every rate limit to 0")
    return uri


def _auditor_keys(args: argparse.Namespace):  # -> tuple[str | None, dict[str, PublicKey]]
    """The trusted auditor keys folder (--auditor-keys, else <models-dir>/trusted-auditors if
    it exists) and the keys in it; a missing explicit folder or a bad key file is an error."""
    from collector.registry import default_auditor_keys, load_trusted_keys

    if args.auditor_keys is not None and not Path(args.auditor_keys).is_dir():
        raise InvalidInputError(f"--auditor-keys {args.auditor_keys}: not a folder")
    folder = args.auditor_keys or default_auditor_keys(args.models_dir)
    return (str(folder) if folder is not None else None), load_trusted_keys(folder)


def registration_mode(args: argparse.Namespace, secret: str | None) -> str:
    """open on a loopback --host without an enrolment secret, invite otherwise, unless chosen."""
    mode = "closed" if args.closed_registration else args.registration
    if mode is None:
        mode = "open" if _is_loopback(args.host) and secret is None else "invite"
    if mode == "open" and not _is_loopback(args.host):
        print(f"pric-collector: warning: --registration open on {args.host}: anyone who reaches it may register",
              file=sys.stderr)
    return mode


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _enrolment_secret(args: argparse.Namespace) -> str | None:
    """From --enrolment-secret-file (first line) or $PRIC_ENROLMENT_SECRET; never from argv."""
    if args.enrolment_secret_file:
        try:
            lines = Path(args.enrolment_secret_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InvalidInputError(f"--enrolment-secret-file {args.enrolment_secret_file}: not UTF-8 text") from None
        secret = lines[0].strip() if lines else ""
        where = f"--enrolment-secret-file {args.enrolment_secret_file}"
    else:
        secret = os.environ.get(ENROLMENT_SECRET_ENV, "").strip()
        where = f"${ENROLMENT_SECRET_ENV}"
        if not secret:
            return None
    from collector.app import MIN_ENROLMENT_SECRET_CHARS

    if len(secret) < MIN_ENROLMENT_SECRET_CHARS:
        raise InvalidInputError(f"{where}: the enrolment secret must have at least {MIN_ENROLMENT_SECRET_CHARS} "
                                "characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return secret


def _labels(args: argparse.Namespace) -> list[str] | None:
    from protocol.wire import LABEL_NAME_RE

    if args.labels and args.labels_file:
        raise InvalidInputError("give --labels or --labels-file, not both")
    if args.labels_file:
        try:
            text = Path(args.labels_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"--labels-file {args.labels_file}: not UTF-8 text") from None
        where = f"--labels-file {args.labels_file}"
    elif args.labels is not None:
        text, where = args.labels, "--labels"
    else:
        return None
    names = [n.strip() for line in text.splitlines() for n in line.split(",") if n.strip()]
    if not names:
        raise InvalidInputError(f"{where}: names no label")
    for name in names:
        if not LABEL_NAME_RE.match(name):
            raise InvalidInputError(f"{where}: {name!r} is not a label name (letters, digits, _ . -; at most 64)")
    return sorted(set(names))


def _token(db, args: argparse.Namespace) -> int:
    from collector.auth import TOKEN_PREFIX, create_staff_token, find_participant, hash_token, revoke_tokens

    if args.token_command == "create":
        print(create_staff_token(db, args.role))
        return 0
    if args.participant is not None:
        participant_id = find_participant(db, args.participant, db.secret("pseudonym_secret"))
        n = revoke_tokens(db, participant_id=participant_id)
        print(f"revoked {n} token{'s' if n != 1 else ''} of participant {args.participant}")
        return 0
    source = sys.stdin if args.token_file == "-" else None
    try:
        text = source.read() if source is not None else Path(args.token_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"--token-file {args.token_file}: not UTF-8 text") from None
    token = text.strip()
    if not token.startswith(TOKEN_PREFIX) or len(token) > 256 or any(c.isspace() for c in token):
        raise InvalidInputError(f"--token-file {args.token_file}: does not hold one PRIC token")
    if revoke_tokens(db, token_hash=hash_token(token)) == 0:
        raise NotFoundError(f"--token-file {args.token_file}: no such token (already revoked?)")
    print("revoked 1 token")
    return 0


def _print_stats(s: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return
    print(f"participants: {s['participants']}")
    print(f"items:        {s['items']}")
    for model_id, n in sorted(s["items_by_model"].items()):
        print(f"  {model_id:<30} {n}")
    if s["labels"]:
        print("labels (0 / 1):")
        for task, c in s["labels"].items():
            print(f"  {task:<30} {c['0']} / {c['1']}")
    if s["classifiers"]:
        print("classifiers:")
        for c in s["classifiers"]:
            print(f"  #{c['id']} {c['task']} on {c['model_id']}: accuracy {c['accuracy']:.3f} "
                  f"(majority {c['majority_rate']:.3f}, {c['n_train']} train / {c['n_test']} test)"
                  f"{' STALE' if c['stale'] else ''}")


def _train(db, args: argparse.Namespace) -> int:
    """A train job run in this process: queued already claimed, so no worker takes it, and
    recorded like a worker's (`jobs list` shows it)."""
    from collector import jobs
    from collector.registry import newest_active_model, recorded_card

    params = jobs.train_params({"task": args.task, "model_id": args.model_id, "kind": args.kind,
                                "epochs": args.epochs}, default_model=lambda: newest_active_model(db))
    recorded_card(db, params["model_id"])  # exit 7 for an unknown model, before queueing
    claim = jobs.enqueue_claimed(db, "train", params)
    with _stop_on_sigterm() as stop:
        status = jobs.run_claimed(db, claim, Path(args.data_dir), max_attempts=1, stop=stop, reraise=True)
    job = jobs.get_job(db, claim.job_id)
    if status != jobs.DONE:
        _raise_job_error(job, status)
    result = job["result"]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"{result['task']} on {result['model_id']}: held-out accuracy {result['accuracy']:.3f} "
              f"vs majority rate {result['majority_rate']:.3f} ({result['n_train']} train / {result['n_test']} test)"
              f" [job {claim.job_id}]")
    return 0


def _raise_job_error(job: dict, status: str) -> None:
    if status == "queued":  # interrupted by SIGTERM: released for a worker
        raise PricError(f"job {job['id']} interrupted; it is queued again for `pric-collector worker`")
    raise PricError(job["error"] or f"job {job['id']} {status}")


@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event SIGTERM sets (a clean stop between epochs), while the block runs."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker(db, args: argparse.Namespace) -> int:
    from collector import jobs

    if not 1 <= args.max_attempts <= 100:
        raise InvalidInputError(f"--max-attempts {args.max_attempts}: must be between 1 and 100")
    if not 3 <= args.lease <= 86_400:
        raise InvalidInputError(f"--lease {args.lease}: must be between 3 and 86400 seconds")
    if not 0.05 <= args.poll <= 3600:
        raise InvalidInputError(f"--poll {args.poll}: must be between 0.05 and 3600 seconds")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with _stop_on_sigterm() as stop:
            ran, last = jobs.run_worker(db, Path(args.data_dir), once=args.once, max_attempts=args.max_attempts,
                                        lease_s=args.lease, poll_s=args.poll, stop=stop)
    except KeyboardInterrupt:  # Ctrl-C while idle; a running job's lease expires and it is retried
        return 0
    if args.once and ran == 0:
        print("pric-collector: worker: no job queued", file=sys.stderr)
    return 1 if args.once and last == jobs.FAILED else 0


def _jobs(db, args: argparse.Namespace) -> int:
    from collector import jobs

    if args.jobs_command == "show":
        job = jobs.get_job(db, args.job_id)
        if args.json:
            print(json.dumps(job, indent=2, sort_keys=True))
        else:
            print(_job_line(job))
            if job["result"] is not None:
                print(json.dumps(job["result"], indent=2, sort_keys=True))
        return 0
    if not 1 <= args.limit <= 10_000:
        raise InvalidInputError(f"--limit {args.limit}: must be between 1 and 10000")
    rows = jobs.list_jobs(db, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        for job in rows:
            print(_job_line(job))
    return 0


def _job_line(job: dict) -> str:
    import datetime

    def when(t: float | None) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"

    p = job["params"]
    what = f"{job['kind']} {p.get('task')} on {p.get('model_id')} ({p.get('kind')})" if job["kind"] == "train" \
        else job["kind"]
    line = f"#{job['id']:<5} {job['status']:<8} {what}; attempts {job['attempts']}; queued {when(job['created_at'])}"
    if job["finished_at"]:
        line += f", finished {when(job['finished_at'])}"
    if job["status"] == "done" and job["result"]:
        r = job["result"]
        line += f"; accuracy {r['accuracy']:.3f} vs majority {r['majority_rate']:.3f}"
    if job["error"]:
        line += f"; error: {job['error']}"
    return line


def _backup(db, args: argparse.Namespace) -> int:
    from collector.store import backup

    summary = backup(db, Path(args.out))
    print(f"backup: {args.out} ({summary['items']} items, {summary['participants']} participants, "
          f"{summary['bytes']} bytes; integrity check ok)")
    return 0


def _db(db, args: argparse.Namespace) -> int:
    import datetime

    from collector import migrations
    from collector.store import backup

    with db.read() as conn:
        state = migrations.schema_state(conn)
    if args.db_command == "current":
        print(f"database {db.display_name}: schema revision {state.describe()}; this release's: {state.head}"
              f"{'' if state.at_head or state.empty else ' (run `pric-collector db upgrade`)'}")
        return 0
    if state.at_head:
        print(f"database {db.display_name}: already at schema revision {state.head}")
        return 0
    if db.is_sqlite and db.path is not None and not state.empty and not args.no_backup and state.known:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = db.path.with_name(f"{db.path.name}.before-{state.head}-{stamp}")
        summary = backup(db, out)
        print(f"backup: {out} ({summary['items']} items, {summary['participants']} participants)")
    db.prepare("upgrade")
    before, after = db.last_upgrade or (state.revision, state.head)
    print(f"database {db.display_name}: upgraded schema from {before or 'empty'} to {after}")
    return 0


def _model(db, args: argparse.Namespace) -> int:
    from collector.registry import ACTIVE, RETIRED, ModelRegistry, list_models, set_status

    _, trusted = _auditor_keys(args)
    # records the published models found on disk, as `serve` would
    registry = ModelRegistry(db, args.models_dir, trusted=trusted, allow_unattested=args.allow_unattested)
    if args.model_command == "list":
        rows = list_models(db)
        recorded = {r["model_id"] for r in rows}
        for model_id, (reg, _reason) in registry.unpublished.items():
            if model_id not in recorded:  # never published: not in the database
                rows.append({"model_id": model_id, "sha256": reg.card.sha256, "kind": reg.card.kind, "status": None,
                             "registered_at": None, "retired_at": None})
        rows.sort(key=lambda r: r["model_id"])
        for r in rows:
            reg = registry.models.get(r["model_id"]) or registry.unpublished.get(r["model_id"], (None, ""))[0]
            r["served"] = r["model_id"] in registry.models  # on disk and published
            r["published"] = registry.is_published(r["model_id"])
            r["attestation"] = registry.attestation(reg).to_dict() if reg is not None else None
        if args.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
        else:
            for r in rows:
                print(f"{r['model_id']:<30} {r['status'] or '-':<8} {r['kind']:<12} sha256 {r['sha256'][:12]}…"
                      f"  {_publication(r)}")
        return 0
    set_status(db, args.model_id, RETIRED if args.model_command == "retire" else ACTIVE)
    print(f"{args.model_id}: {'retired' if args.model_command == 'retire' else 'active'}")
    return 0


def _publication(row: dict) -> str:
    """One phrase: whether `serve` with the same options publishes the model, and why."""
    att = row["attestation"]
    if att is None:
        return "(not on disk)"
    if att["valid"]:
        return f"published: {att['reason']}"
    if row["published"]:
        return f"published UNATTESTED (--allow-unattested): {att['reason']}"
    return f"NOT PUBLISHED: {att['reason']}"


if __name__ == "__main__":
    raise SystemExit(main())
