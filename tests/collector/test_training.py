"""Downstream training through a real HTTP collector (the `live_collector` fixture) on
features computed by the tiny ONNX model from images whose label it can see."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import requests

from collector import jobs
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import UploadBatch, UploadItem, encode_batch

TIMEOUT = 30


def tiny_features(model_path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16, 8, 8) features of random 64x64 images; label 1 = a bright top-left square."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(n, 3, 64, 64)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int64)
    images[labels == 1, :, :16, :16] += 1.5
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"image": images})
    return features.astype(np.float32), labels


def test_classifier_on_tiny_model_features_beats_majority(live_collector):
    card = load_card(live_collector.models_dir / "tiny")
    features, labels = tiny_features(live_collector.models_dir / "tiny" / card.file, 120)
    url = live_collector.url
    participants = [requests.post(url + routes.REGISTER, timeout=TIMEOUT).json() for _ in range(3)]
    for p, share in zip(participants, np.array_split(np.arange(len(labels)), 3)):
        items = [UploadItem(f"img-{i}", {card.output.name: features[i]}, {"Smiling": int(labels[i])}) for i in share]
        resp = requests.post(url + routes.ITEMS, data=encode_batch(UploadBatch(card.model_id, card.sha256, items)),
                             headers={"Authorization": "Bearer " + p["token"], "Content-Type": "application/json"},
                             timeout=TIMEOUT)
        assert resp.json() == {"stored": len(share), "duplicates": 0}

    operator = {"Authorization": "Bearer " + live_collector.operator_token}
    queued = requests.post(url + routes.TRAIN, json={"task": "Smiling"}, headers=operator, timeout=TIMEOUT)
    assert queued.status_code == 202 and queued.headers["Location"] == queued.json()["status_url"]
    # the job runs in a worker (here: this process, as `pric-collector worker --once` would)
    assert jobs.run_worker(live_collector.app.extensions["pric"].db, live_collector.data_dir, once=True) == (1, "done")
    job = requests.get(url + queued.json()["status_url"], headers=operator, timeout=TIMEOUT).json()
    assert job["status"] == "done"
    result = job["result"]

    assert result["model_id"] == card.model_id
    assert result["n_train"] + result["n_test"] == len(labels)
    # held out by participant: one of the three (40 items) is never trained on
    assert (result["n_train_participants"], result["n_test_participants"]) == (2, 1)
    assert result["n_test"] == 40
    assert result["accuracy"] > result["majority_rate"] + 0.2
    auditor = {"Authorization": "Bearer " + live_collector.auditor_token}
    exported = requests.get(url + routes.EXPORT, params={"limit": 1000}, headers=auditor, timeout=TIMEOUT).json()
    assert len(exported["items"]) == len(labels)
    assert len({item["participant"] for item in exported["items"]}) == 3
