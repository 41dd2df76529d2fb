"""Issue 16, item 4: a real `pric-collector serve` under four concurrent 8 MiB JSON bodies
keeps its memory bounded (JSON uploads are limited to a small body and refused from the
Content-Length, before the body is read).

Also a measuring script, run from the repository root:

    python tests/collector/test_json_flood.py [--tree DIR] [--rounds 3]

prints the server's resident memory before the flood and at its peak (sampled every
10 ms), and the answers' status codes. --tree runs the collector of another checkout.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
FLOOD_BYTES = 8 * 1024 * 1024 - 4096  # just under the 8 MiB body limit


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _flood_body(model_id: str, sha256: str) -> bytes:
    """The costliest 8 MiB JSON upload to refuse: 256 items whose arrays are valid .npy
    (so a decoder materialises each), the last one with a bad item id (400 at the end)."""
    import numpy as np

    from protocol.wire import array_to_npy

    n_items, overhead = 256, 120
    n_floats = ((FLOOD_BYTES - 300) // n_items - overhead) * 3 // 4 // 4 - 40
    blob = base64.b64encode(array_to_npy(np.ones(n_floats, np.float32))).decode()
    items = [{"item_id": f"flood-{i}", "arrays": {"feature": blob}, "labels": {}} for i in range(n_items)]
    items[-1]["item_id"] = "not a valid id"
    body = json.dumps({"schema_version": 1, "model_id": model_id, "model_sha256": sha256, "items": items}).encode()
    assert len(body) <= FLOOD_BYTES, len(body)
    return body


def measure(tree: Path, rounds: int = 3, concurrency: int = 4) -> dict:
    spec = importlib.util.spec_from_file_location("_pric_tests_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    from collector.launch import start_process, stop

    with tempfile.TemporaryDirectory() as tmp:
        card = conftest.write_tiny_features_model(Path(tmp) / "models" / "tiny")
        env_before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(tree)
        try:
            proc, url = start_process([sys.executable, "-m", "collector.cli", "serve", "--data-dir", f"{tmp}/data",
                                       "--models-dir", f"{tmp}/models", "--host", "127.0.0.1", "--port", "0",
                                       "--quiet", "--threads", "8", "--rate-limit", "0"])
        finally:
            if env_before is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = env_before
        try:
            token = requests.post(url + "/api/v1/participants", timeout=10).json()["token"]
            headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
            body = _flood_body(card.model_id, card.sha256)
            requests.get(url + "/api/v1/health", timeout=10)
            time.sleep(0.5)
            before = _rss_kib(proc.pid)
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    try:
                        peak.append(_rss_kib(proc.pid))
                    except (OSError, RuntimeError):
                        return
                    time.sleep(0.01)

            statuses: list[int] = []

            def send() -> None:
                try:
                    statuses.append(requests.post(url + "/api/v1/items", data=body, headers=headers,
                                                  timeout=60).status_code)
                except requests.RequestException as exc:
                    statuses.append(type(exc).__name__)  # type: ignore[arg-type]

            sampler = threading.Thread(target=sample)
            sampler.start()
            for _ in range(rounds):
                senders = [threading.Thread(target=send) for _ in range(concurrency)]
                for t in senders:
                    t.start()
                for t in senders:
                    t.join()
            time.sleep(0.2)
            done.set()
            sampler.join()
            hwm = _rss_kib(proc.pid, "VmHWM")
            after = _rss_kib(proc.pid)
            alive = proc.poll() is None
        finally:
            stop(proc)
    return {"body_bytes": len(body), "concurrency": concurrency, "rounds": rounds,
            "rss_before_mib": round(before / 1024, 1), "rss_peak_mib": round(max(max(peak), hwm) / 1024, 1),
            "rss_after_mib": round(after / 1024, 1), "statuses": sorted(map(str, statuses)), "alive": alive}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_four_concurrent_8mib_json_bodies_keep_memory_bounded():
    result = measure(REPO, rounds=2)
    assert result["alive"]
    assert set(result["statuses"]) == {"413"}, result
    assert result["rss_peak_mib"] - result["rss_before_mib"] < 48, result  # it grew by ~445 MiB before


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose collector to run (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(measure(a.tree.resolve(), a.rounds)))
