"""`pric-collector serve` on gunicorn: start-up checks, body and header limits, graceful
reload on SIGHUP, worker recycling, and serving processes that never load torch."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from collector.cli import main as cli_main
from collector.launch import start_collector, stop
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, UploadItem, encode_batch_binary

from .test_app import assert_error

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _raw(url: str, request: bytes, read: int = 300) -> bytes:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(read)


def _binary_body(card, item_id: str = "one") -> bytes:
    return encode_batch_binary(UploadBatch(card.model_id, card.sha256, [
        UploadItem(item_id, {"feature": np.zeros((16, 8, 8), np.float32)}, {"Smiling": 1})]))


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "0"], "--timeout 0: must be between 1 and 3600"),
    (["--graceful-timeout", "-1"], "--graceful-timeout -1: must be between 1 and 3600"),
    (["--max-requests", "-1"], "--max-requests -1: must be between 0 and 1000000000"),
    (["--workers", "0"], "--workers 0: must be between 1 and 64"),
])
def test_serve_refuses_bad_server_settings_in_one_line(tmp_path, tiny_model_dir, capsys, args, message):
    rc = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir), *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "d").exists()


def test_serve_binds_loopback_by_default():
    from collector.cli import build_parser

    args = build_parser().parse_args(["serve", "--data-dir", "d"])
    assert args.host == "127.0.0.1"


def test_a_declared_body_over_the_limit_is_413_before_the_token_is_looked_at(kit):
    resp = kit.client.post(routes.TRAIN, data=b"{" + b" " * routes.MAX_CONTROL_BODY_BYTES + b"}",
                           content_type="application/json")
    assert_error(resp, 413, "payload_too_large")
    resp = kit.client.post(routes.ITEMS, data=b"", content_type=BINARY_CONTENT_TYPE,
                           environ_overrides={"CONTENT_LENGTH": str(routes.MAX_BODY_BYTES + 1)})
    assert_error(resp, 413, "payload_too_large")


@pytest.mark.slow
@linux_only
def test_served_collector_bounds_chunked_bodies_request_lines_and_headers(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    assert cli_main(["token", "create", "--role", "operator", "--data-dir", str(data)]) == 0
    operator = capsys.readouterr().out.strip()
    proc, url = start_collector(data, tiny_model_dir)
    try:
        # no Content-Length: the body is read up to the route's limit, then 413
        chunk = b"x" * 8192
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(routes.MAX_CONTROL_BODY_BYTES // 8192 + 4))
        answer = _raw(url, b"POST " + routes.TRAIN.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + operator.encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunks + b"0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        # an upload without Content-Length is refused unread
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        answer = _raw(url, b"POST " + routes.ITEMS.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + token.encode() + b"\r\nContent-Type: " + BINARY_CONTENT_TYPE.encode()
                      + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 411"), answer
        # the request line and the headers are bounded by the server itself
        answer = _raw(url, b"GET /" + b"a" * (routes.MAX_REQUEST_LINE_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414"), answer
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(routes.MAX_REQUEST_HEADERS + 5))
        answer = _raw(url, b"GET " + routes.HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer
        answer = _raw(url, b"GET " + routes.HEALTH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: "
                      + b"v" * (routes.MAX_REQUEST_HEADER_BYTES + 10) + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer
        assert requests.get(url + routes.HEALTH, timeout=10).status_code == 200
    finally:
        stop(proc)


@pytest.mark.slow
@linux_only
def test_sighup_reloads_workers_gracefully_and_picks_up_new_models(tmp_path, tiny_model_dir, write_model):
    proc, url = start_collector(tmp_path / "data", tiny_model_dir, "--workers", "2", "--rate-limit", "0",
                                "--read-rate-limit", "0", "--register-rate-limit", "0")
    try:
        before = set(_wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), what="two workers"))
        assert requests.get(url + routes.HEALTH, timeout=10).json()["models"] == ["tiny@1"]
        write_model(tiny_model_dir / "second", name="second")
        proc.send_signal(signal.SIGHUP)
        after = _wait_for(lambda: (c := set(_children(proc.pid))) and not c & before and len(c) == 2 and c,
                          what="new workers after SIGHUP")
        assert proc.poll() is None and not after & before
        models = _wait_for(lambda: requests.get(url + routes.HEALTH, timeout=10).json()["models"] == ["second@1", "tiny@1"],
                           what="the new model served")
        assert models
    finally:
        stop(proc)
    assert proc.returncode == 0  # TERM: a graceful stop


@pytest.mark.slow
@linux_only
def test_workers_are_recycled_after_max_requests(tmp_path, tiny_model_dir):
    proc, url = start_collector(tmp_path / "data", tiny_model_dir, "--max-requests", "5",
                                "--max-requests-jitter", "0", "--read-rate-limit", "0")
    try:
        first = _wait_for(lambda: _children(proc.pid), what="a worker")
        with requests.Session() as s:
            codes = [s.get(url + routes.HEALTH, timeout=10).status_code for _ in range(5)]
        later = _wait_for(lambda: (c := _children(proc.pid)) and c != first and c, what="a recycled worker")
        assert codes == [200] * 5 and set(later).isdisjoint(first)
        assert requests.get(url + routes.HEALTH, timeout=10).status_code == 200
    finally:
        stop(proc)


def _loads_torch(pid: int) -> bool:
    """Whether a process has torch's native library mapped (it is once torch is imported)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "/torch/_C" in maps


@pytest.mark.slow
@linux_only
def test_serving_processes_never_load_torch(tmp_path, tiny_model_dir, capsys):
    """Every route but /train (a job, not a request: the training branch queues it) is
    called on a served collector; neither the master nor a worker has torch loaded."""
    pytest.importorskip("torch")  # where torch is absent the check proves nothing
    data = tmp_path / "data"
    assert cli_main(["token", "create", "--role", "operator", "--data-dir", str(data)]) == 0
    operator = {"Authorization": "Bearer " + capsys.readouterr().out.strip()}
    card = load_card(tiny_model_dir / "tiny")
    proc, url = start_collector(data, tiny_model_dir)
    try:
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        me = {"Authorization": "Bearer " + token}
        calls = [
            ("GET", routes.HEALTH, {}), ("GET", routes.ME, me), ("GET", routes.MODEL_CARD, me),
            ("GET", routes.MODEL_FILE, me), ("GET", routes.model_card_url(card.model_id), me),
            ("GET", routes.model_attestations_url(card.model_id), me), ("GET", routes.STATS, operator),
            ("GET", routes.EXPORT, operator), ("DELETE", routes.ME + "?keep_token=1", me),
        ]
        upload = requests.post(url + routes.ITEMS, data=_binary_body(card), timeout=10,
                               headers={**me, "Content-Type": BINARY_CONTENT_TYPE})
        assert upload.status_code == 200, upload.text
        for method, path, headers in calls:
            resp = requests.request(method, url + path, headers=headers, timeout=10)
            assert resp.status_code == 200, (path, resp.status_code, resp.text[:200])
        for pid in [proc.pid, *_children(proc.pid)]:
            assert not _loads_torch(pid), f"process {pid} of the served collector loaded torch"
    finally:
        stop(proc)


# --- rate limits (Flask-Limiter): storage, workers, Redis -----------------------------------------

REDIS_URL = os.environ.get("PRIC_TEST_REDIS_URL") or None
needs_redis = pytest.mark.skipif(REDIS_URL is None, reason="set PRIC_TEST_REDIS_URL=redis://127.0.0.1:6379/0 "
                                                            "(a running Redis) to test shared rate limits")


@pytest.mark.parametrize(("uri", "shown"), [
    ("redis://:hunter2secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://pric:hunter2secret@cache.internal:6379/1", "redis://pric:***@cache.internal:6379/1"),
    ("rediss://hunter2secret@cache.internal:6380", "rediss://***@cache.internal:6380"),
    ("redis+sentinel://cache:26379/mymaster?password=hunter2secret&db=0",
     "redis+sentinel://cache:26379/mymaster?password=%2A%2A%2A&db=0"),
    ("memory://", "memory://"),
])
def test_storage_uri_is_shown_without_its_password(uri, shown):
    from collector.limits import masked_uri

    assert masked_uri(uri) == shown and "hunter2secret" not in masked_uri(uri)


def test_several_workers_with_memory_storage_are_refused_in_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("PRIC_RATE_LIMIT_STORAGE", raising=False)
    rc = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir), "--workers", "3",
                   "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--workers 3 with rate-limit storage memory://: each worker process would count on its own" in err
    assert "--rate-limit-storage redis://" in err and not (tmp_path / "d").exists()


def test_several_workers_take_the_storage_from_the_environment(monkeypatch):
    from collector.cli import _rate_limit_storage, build_parser

    args = build_parser().parse_args(["serve", "--data-dir", "d", "--workers", "4"])
    monkeypatch.setenv("PRIC_RATE_LIMIT_STORAGE", "redis://:pw@10.0.0.5:6379/0")
    assert _rate_limit_storage(args) == "redis://:pw@10.0.0.5:6379/0"
    monkeypatch.delenv("PRIC_RATE_LIMIT_STORAGE")
    off = build_parser().parse_args(["serve", "--data-dir", "d", "--workers", "4", "--rate-limit", "0",
                                     "--read-rate-limit", "0", "--register-rate-limit", "0"])
    assert _rate_limit_storage(off) == "memory://"  # nothing to count: nothing to share


@pytest.mark.parametrize(("uri", "rc", "message"), [
    ("redis://:hunter2secret@127.0.0.1:1/0", 9, "rate-limit storage redis://:***@127.0.0.1:1/0 is unreachable"),
    ("nosuch://host", 2, "rate-limit storage nosuch://host: "),
])
def test_a_bad_or_unreachable_storage_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys, uri, rc, message):
    got = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir),
                    "--rate-limit-storage", uri, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert got == rc and len(err.splitlines()) == 1 and message in err, err
    assert "hunter2secret" not in err and not (tmp_path / "d").exists()


def test_each_budget_counts_separately_and_registration_per_address(tmp_path, tiny_model_dir, make_kit):
    from collector.app import create_app

    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir),
                      "REGISTER_LIMIT_PER_MIN": 4, "READ_LIMIT_PER_MIN": 6, "RATE_LIMIT_PER_MIN": 6})
    try:
        kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
        _, h = kit.register()  # a burst of one registration per address (4/min: one each 15 s)
        again = kit.client.post(routes.REGISTER)
        assert_error(again, 429, "rate_limited")
        assert 1 <= int(again.headers["Retry-After"]) <= 15
        other = kit.client.post(routes.REGISTER, environ_base={"REMOTE_ADDR": "127.0.0.2"})
        assert other.status_code == 201  # another address has its own budget
        assert kit.client.get(routes.ME, headers=h).status_code == 200
        assert_error(kit.client.get(routes.MODEL_CARD, headers=h), 429, "rate_limited")  # one read budget
        assert kit.upload(h, _binary_body(kit.card), content_type=BINARY_CONTENT_TYPE).status_code == 200
        assert kit.client.get(routes.HEALTH).status_code == 200  # liveness is never limited
    finally:
        app.extensions["pric"].db.dispose()


@needs_redis
def test_apps_sharing_a_redis_storage_share_each_budget(tmp_path, tiny_model_dir, make_kit):
    """Two apps (as two workers or hosts would be) over one database and one Redis: a
    token's burst of one upload holds across both."""
    from collector.app import create_app

    config = {"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), "RATE_LIMIT_PER_MIN": 6,
              "RATE_LIMIT_STORAGE": REDIS_URL}
    first, second = create_app(config), create_app(config)
    try:
        card = load_card(tiny_model_dir / "tiny")
        a, b = make_kit(first, card), make_kit(second, card)
        _, h = a.register()
        assert a.upload(h, _binary_body(card, "x"), content_type=BINARY_CONTENT_TYPE).status_code == 200
        limited = b.upload(h, _binary_body(card, "y"), content_type=BINARY_CONTENT_TYPE)
        assert_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 10
    finally:
        first.extensions["pric"].db.dispose()
        second.extensions["pric"].db.dispose()


@pytest.mark.slow
@linux_only
@needs_redis
def test_served_workers_share_one_rate_limit_through_redis(tmp_path, tiny_model_dir):
    """Two gunicorn workers, a fresh connection per request (the kernel hands each to either
    worker): the token's burst of one holds across them (6/min: the next request is allowed
    only 10 s later, well after this test's 16 requests)."""
    card = load_card(tiny_model_dir / "tiny")
    proc, url = start_collector(tmp_path / "data", tiny_model_dir, "--rate-limit", "6", "--workers", "2",
                                "--rate-limit-storage", REDIS_URL)
    try:
        workers = _wait_for(lambda: len(_children(proc.pid)) == 2 and _children(proc.pid), what="two workers")
        token = requests.post(url + routes.REGISTER, timeout=10).json()["token"]
        auth = {"Authorization": "Bearer " + token, "Content-Type": BINARY_CONTENT_TYPE}
        codes = [requests.post(url + routes.ITEMS, data=_binary_body(card), headers=auth, timeout=10).status_code
                 for _ in range(16)]
    finally:
        stop(proc)
    assert len(workers) == 2
    assert codes == [200] + [429] * 15  # per-worker counts would let a second request through


def test_a_storage_lost_after_the_start_answers_503_and_counts_nothing(tmp_path, tiny_model_dir, make_kit):
    from collector.app import create_app

    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir),
                      "RATE_LIMIT_STORAGE": "redis://127.0.0.1:1/0"})  # nothing listens on port 1
    try:
        kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
        resp = kit.client.post(routes.REGISTER)
        assert_error(resp, 503, "unavailable")
        assert "rate-limit storage" in resp.json["message"]
        assert kit.client.get(routes.HEALTH).status_code == 200
    finally:
        app.extensions["pric"].db.dispose()
