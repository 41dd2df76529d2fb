"""Two collector nodes on one PostgreSQL database behind haproxy, as docs/deploy.md runs
them on several hosts: a node killed with SIGKILL in the middle of a stream of uploads and
restarted loses and duplicates nothing; the per-token rate limit (Redis) and training jobs
(database queue) are shared by the nodes."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests

from client.api import CollectorAPI, HttpConfig
from protocol import routes
from protocol.wire import BINARY_CONTENT_TYPE

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

ITEMS, CLIENTS, BATCH = 20_000, 16, 25
DEADLINE_S = 150.0  # the whole upload stream; each client's CollectorAPI deadline
JOB_API = f"{routes.API}/jobs"  # GET JOB_API/<job_id> (operator): a training job's status
JOB_DONE = ("done", "succeeded", "finished")
JOB_FAILED = ("failed", "error")


def bearer(token: str) -> dict[str, str]:
    return {routes.AUTH_HEADER: routes.BEARER + token}


def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "collector.cli", "serve", "--help"], capture_output=True,
                          text=True, timeout=60).stdout


def test_a_node_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(engines, tmp_path, mn):
    """16 participants upload 20,000 items through haproxy; node0 is SIGKILLed a quarter of
    the way in and restarted on its port; every client finishes (its CollectorAPI retries
    what the kill cut), the database holds each item exactly once, and the restarted node
    serves again."""
    # the shared Redis rate limit where serve has it (docs/deploy.md); uploads stay within it
    shared = ["--rate-limit-storage", engines.redis_url] if "--rate-limit-storage" in serve_help() else []
    with mn.cluster(engines, tmp_path, 2, shared) as c:
        bodies = mn.make_bodies(c.card, ITEMS, CLIENTS, BATCH)
        tokens = [CollectorAPI(c.balancer.url, http=HttpConfig(timeout_s=30)).register()["token"]
                  for _ in range(CLIENTS)]
        gate = threading.Event()
        logs = [mn.ClientLog([], []) for _ in range(CLIENTS)]
        uploader = threading.Thread(target=mn.upload_clients,
                                    args=(c.balancer.url, tokens, bodies, c.card.model_id, DEADLINE_S, gate, logs))
        uploader.start()
        victim = c.nodes[0]
        try:
            start = time.monotonic()
            while sum(len(log.acked_ids) for log in logs) < ITEMS // 4:
                assert time.monotonic() - start < DEADLINE_S, "the stream never reached a quarter"
                time.sleep(0.02)
            # a quarter acknowledged: requests are in flight on both nodes
            victim.kill()
            victim.start()
            c.balancer.wait_up({victim.name})
            served_before = int(c.balancer.servers()[victim.name]["stot"])
        finally:
            gate.set()  # the second half of every client's batches
            uploader.join(timeout=DEADLINE_S + 60)
        assert not uploader.is_alive(), "the upload stream did not stop by its deadline"
        assert [log.error for log in logs if log.error] == []
        after = c.balancer.servers()
        served_after = int(after[victim.name]["stot"])
        rows, distinct, ids = mn.count_items(c.database_url)

    expected = {i for client in bodies for ids_, _ in client for i in ids_}
    acked = [i for log in logs for i in log.acked_ids]
    assert len(acked) == len(set(acked)) == ITEMS and set(acked) == expected
    assert sum(log.stored + log.duplicates for log in logs) == ITEMS  # each batch answered once in full
    assert (rows, distinct) == (ITEMS, ITEMS), "lost or duplicated rows"
    assert ids == expected
    assert served_after > served_before, "the restarted node got no requests"
    cut = {name: {k: row[k] for k in ("eresp", "econ", "wretr", "wredis")} for name, row in after.items()}
    print(f"\nstored {sum(log.stored for log in logs)} + duplicates {sum(log.duplicates for log in logs)} "
          f"(batches retried after the kill); haproxy errors/retries per node: {cut}")


def test_the_per_token_rate_limit_holds_across_nodes(engines, tmp_path, mn):
    """One participant spends its upload budget on node0; node1, sharing the limiter's
    Redis storage, refuses its next upload with 429 and Retry-After (a per-process
    limiter would let every node grant a fresh budget)."""
    if "--rate-limit-storage" not in serve_help():
        pytest.fail("pric-collector serve has no --rate-limit-storage URI (the limiter's shared storage)")
    with mn.cluster(engines, tmp_path, 2, ["--rate-limit", "6", "--rate-limit-storage", engines.redis_url]) as c:
        token = CollectorAPI(c.nodes[0].url).register()["token"]
        bodies = [body for _ids, body in mn.make_bodies(c.card, 40, 1, 1)[0]]
        headers = {**bearer(token), "Content-Type": BINARY_CONTENT_TYPE}
        granted = 0
        for body in bodies[:20]:
            resp = requests.post(c.nodes[0].url + routes.ITEMS, data=body, headers=headers, timeout=30)
            if resp.status_code == 429:
                break
            assert resp.status_code == 200, resp.text
            granted += 1
        assert 1 <= granted <= 6, f"node0 granted {granted} uploads under a limit of 6 a minute"
        resp = requests.post(c.nodes[1].url + routes.ITEMS, data=bodies[20], headers=headers, timeout=30)
        assert resp.status_code == 429, f"node1 granted a fresh budget: {resp.status_code} {resp.text[:200]}"
        assert float(resp.headers["Retry-After"]) > 0
        rows, _, _ = mn.count_items(c.database_url)
        assert rows == granted


def test_a_training_job_queued_on_one_node_is_seen_and_finished_from_the_other(engines, tmp_path, mn):
    """POST TRAIN on node0 answers 202 with a job id; node1 reports that job (the queue is
    the shared database); `pric-collector worker` runs it, and node1 then reports it done."""
    with mn.cluster(engines, tmp_path, 2) as c:
        operator = c.operator_token()
        # two participants: the collector holds out whole participants (collector.train_job)
        for bodies in mn.make_bodies(c.card, 400, 2, 100):
            participant = CollectorAPI(c.nodes[0].url)
            participant.token = participant.register()["token"]
            for _ids, body in bodies:
                participant.upload(body, c.card.model_id)

        resp = requests.post(c.nodes[0].url + routes.TRAIN, json={"task": "Smiling"}, headers=bearer(operator),
                             timeout=30)
        assert resp.status_code == 202, f"{resp.status_code} {resp.text[:300]}"
        job_id = resp.json()["job_id"]
        seen = requests.get(f"{c.nodes[1].url}{JOB_API}/{job_id}", headers=bearer(operator), timeout=30)
        assert seen.status_code == 200, f"{seen.status_code} {seen.text[:300]}"
        assert seen.json()["status"] not in JOB_FAILED

        worker = subprocess.Popen([sys.executable, "-m", "collector.cli", "worker", "--data-dir", str(c.data_dir),
                                   "--database-url", c.database_url], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            deadline, status = time.monotonic() + 120, None
            while time.monotonic() < deadline and worker.poll() is None:
                status = requests.get(f"{c.nodes[1].url}{JOB_API}/{job_id}", headers=bearer(operator),
                                      timeout=30).json()["status"]
                if status in JOB_DONE + JOB_FAILED:
                    break
                time.sleep(0.5)
        finally:
            worker.terminate()
            try:
                _, err = worker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                _, err = worker.communicate(timeout=10)
        job = requests.get(f"{c.nodes[1].url}{JOB_API}/{job_id}", headers=bearer(operator), timeout=30).json()
        assert status in JOB_DONE, f"job {job_id} ended {status!r} ({str(job.get('error'))[:300]}); worker: {err[-300:]}"


def test_pg_dump_while_serving_then_pg_restore_keeps_every_item_and_token(engines, tmp_path, mn):
    """docs/deploy.md's backup: pg_dump of the live database, pg_restore into an empty one;
    a node on the restored database holds every item and accepts the old token (its hash
    and the pseudonym secret are in the dump): the same uploads are all duplicates."""
    dump = tmp_path / "pric.dump"
    with mn.cluster(engines, tmp_path / "live", 1) as c:
        api = CollectorAPI(c.balancer.url)
        token = api.token = api.register()["token"]
        bodies = [body for _ids, body in mn.make_bodies(c.card, 1000, 1, 100)[0]]
        assert sum(api.upload(body, c.card.model_id)["stored"] for body in bodies) == 1000
        conninfo, env = mn.libpq(c.database_url)
        subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", f"--dbname={conninfo}"], env=env,
                       check=True, timeout=120)
    with mn.fresh_database(engines.postgres_url) as restored:
        conninfo, env = mn.libpq(restored)
        subprocess.run(["pg_restore", "--exit-on-error", f"--dbname={conninfo}", str(dump)], env=env,
                       check=True, timeout=120)
        node = mn.Node("restored", tmp_path / "restored", tmp_path / "live" / "models", restored).start()
        try:
            again = CollectorAPI(node.url, token)
            answers = [again.upload(body, c.card.model_id) for body in bodies]
        finally:
            node.stop()
        rows, distinct, _ = mn.count_items(restored)
    assert sum(a["stored"] for a in answers) == 0 and sum(a["duplicates"] for a in answers) == 1000
    assert rows == distinct == 1000


def test_db_upgrade_prepares_an_empty_database_for_the_nodes(engines, tmp_path, mn):
    """docs/deploy.md's upgrade step: `pric-collector db upgrade` brings the shared database
    to the code's schema (twice is a no-op), then nodes start on it."""
    with mn.fresh_database(engines.postgres_url) as db:
        for _ in range(2):
            done = subprocess.run([sys.executable, "-m", "collector.cli", "db", "upgrade", "--database-url", db,
                                   "--data-dir", str(tmp_path / "admin")], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr[-500:]
        mn.synthetic_model(tmp_path / "models")
        node = mn.Node("n", tmp_path, tmp_path / "models", db).start()
        try:
            assert requests.get(node.url + routes.HEALTH, timeout=10).json()["status"] == "ok"
        finally:
            node.stop()


def _make_self_signed(folder):
    """tests/client/test_tls.py's self-signed certificate for 127.0.0.1 (one owner of it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "client" / "test_tls.py"
    spec = importlib.util.spec_from_file_location("_pric_test_tls", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.make_self_signed(folder)


def docs_haproxy_block() -> str:
    """The ```haproxy block of docs/deploy.md: the operator's configuration."""
    import re
    from pathlib import Path

    found = re.search(r"```haproxy\n(.*?)```", (Path(__file__).parents[2] / "docs" / "deploy.md").read_text(), re.S)
    assert found, "docs/deploy.md has no haproxy block"
    return found.group(1)


def test_the_documented_haproxy_configuration_terminates_tls_and_balances(engines, tmp_path, mn):
    """docs/deploy.md's haproxy configuration, with only its listening address, certificate
    and server addresses replaced: participants register and upload over verified TLS,
    an oversized body is refused with 413 before a node sees it, and with a node killed
    the next uploads go to the other one."""
    cert, key = _make_self_signed(tmp_path / "tls")
    pem = tmp_path / "tls" / "pric.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    pem.chmod(0o600)
    with mn.cluster(engines, tmp_path, 2) as c:
        port = mn.free_port()
        config = docs_haproxy_block()
        for old, new in (("bind :443", f"bind 127.0.0.1:{port}"), ("/etc/haproxy/pric.pem", str(pem)),
                         ("10.0.0.11:8080", f"127.0.0.1:{c.nodes[0].port}"),
                         ("10.0.0.12:8080", f"127.0.0.1:{c.nodes[1].port}")):
            assert old in config, f"docs/deploy.md's haproxy block no longer holds {old!r}"
            config = config.replace(old, new)
        (tmp_path / "docs-haproxy.cfg").write_text(config)
        proxy = subprocess.Popen([engines.haproxy, "-db", "-f", str(tmp_path / "docs-haproxy.cfg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"https://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:  # until it listens and its first health checks passed
                try:
                    if requests.get(url + routes.HEALTH, verify=str(cert), timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline and proxy.poll() is None, "haproxy (docs config) did not serve"
                time.sleep(0.2)
            api = CollectorAPI(url, ca_bundle=str(cert))
            api.token = api.register()["token"]
            bodies = [body for _ids, body in mn.make_bodies(c.card, 200, 1, 20)[0]]
            assert api.upload(bodies[0], c.card.model_id)["stored"] == 20

            # only the headers of an oversized upload: haproxy answers before any body byte
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                               context=ssl.create_default_context(cafile=str(cert)))
            conn.putrequest("POST", routes.ITEMS)
            for name, value in {**bearer(api.token), "Content-Type": BINARY_CONTENT_TYPE,
                                "Content-Length": str(routes.MAX_BODY_BYTES + 1)}.items():
                conn.putheader(name, value)
            conn.endheaders()
            refused = conn.getresponse()
            assert refused.status == 413
            assert "json" not in (refused.getheader("Content-Type") or "")  # haproxy's page, not a node's error
            conn.close()

            c.nodes[0].kill()  # the health checks (2 s apart, 2 failures) and redispatch cover the rest
            assert sum(api.upload(body, c.card.model_id)["stored"] for body in bodies[1:]) == 180
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
        rows, distinct, _ = mn.count_items(c.database_url)
    assert rows == distinct == 200
