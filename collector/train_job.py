"""Downstream training: the collector's own classifier for one task on stored features.

Items of one model only (features of different models live in different spaces, so they
are never mixed). Train/held-out split by hashing (participant, item id): stable across
runs and independent of upload order, about 80/20. torch is imported inside the job so
that the web app starts without it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from collector.db import Database, classifier_participants, classifiers, items, unpack_arrays
from collector.registry import recorded_card
from protocol.errors import ValidationError
from protocol.model_card import ModelCard
from protocol.sparse_code import code_from_arrays

MIN_TRAIN = 8
MIN_TEST = 2
TEST_PERCENT = 20


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "logistic"  # logistic | mlp
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    hidden: int = 64
    seed: int = 0


@dataclass
class LabelledSet:
    """X: float32 (N, D) flattened features; y: int64 (N,); is_test: bool (N,)."""

    X: np.ndarray
    y: np.ndarray
    is_test: np.ndarray
    participants: set[str]


def is_held_out(participant_id: str, item_id: str) -> bool:
    digest = hashlib.sha256(f"{participant_id}/{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


def item_vector(arrays: dict[str, np.ndarray], card: ModelCard) -> np.ndarray:
    """One stored item → flat float32 (D,); a sparse code is decoded 'as is' to (L, m)."""
    if card.kind == "sparse_code":
        assert card.sparse is not None
        dense = code_from_arrays(arrays, card.sparse).to_dense(card.sparse.m)
        return dense.reshape(-1)
    return arrays[card.output.name].astype(np.float32).reshape(-1)


def load_labelled(db: Database, model_id: str, task: str) -> LabelledSet:
    card = recorded_card(db, model_id)
    xs, ys, test, who = [], [], [], set()
    with db.read() as conn:
        rows = conn.execute(select(items.c.participant_id, items.c.item_id, items.c.arrays, items.c.array_names, items.c.labels)
                            .where(items.c.model_id == model_id).order_by(items.c.id))
        for r in rows:
            label = json.loads(r.labels).get(task)
            if label is None:
                continue
            xs.append(item_vector(unpack_arrays(r.arrays, r.array_names), card))
            ys.append(int(label))
            test.append(is_held_out(r.participant_id, r.item_id))
            who.add(r.participant_id)
    dim = int(np.prod(card.output.shape)) if card.kind == "features" else 0
    X = np.stack(xs) if xs else np.zeros((0, dim), np.float32)
    return LabelledSet(X=X, y=np.asarray(ys, np.int64), is_test=np.asarray(test, bool), participants=who)


def fit_and_score(data: LabelledSet, cfg: TrainConfig) -> tuple[float, float, dict[str, np.ndarray]]:
    """Train on the train part, score on the held-out part.

    Returns (accuracy, majority rate of the held-out labels, parameters as arrays).
    """
    import torch

    # One intra-op thread: these problems are tiny, and OpenMP workers spinning on a busy
    # machine made a 0.1 s fit take a minute. Restored after the job (process-global).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_score(torch, data, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit_and_score(torch, data: LabelledSet, cfg: TrainConfig) -> tuple[float, float, dict[str, np.ndarray]]:  # noqa: ANN001
    Xtr, ytr = data.X[~data.is_test], data.y[~data.is_test]
    Xte, yte = data.X[data.is_test], data.y[data.is_test]
    mean = Xtr.mean(axis=0)
    std = Xtr.std(axis=0) + 1e-6
    torch.manual_seed(cfg.seed)
    xt = torch.from_numpy((Xtr - mean) / std)
    yt = torch.from_numpy(ytr.astype(np.float32))
    if cfg.kind == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], cfg.hidden), torch.nn.ReLU(),
                                  torch.nn.Linear(cfg.hidden, 1))
    else:
        net = torch.nn.Linear(xt.shape[1], 1)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(cfg.epochs):  # full batch: the stored sets are small
        opt.zero_grad()
        loss = loss_fn(net(xt).squeeze(1), yt)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = (net(torch.from_numpy((Xte - mean) / std)).squeeze(1) > 0).numpy().astype(np.int64)
    accuracy = float((pred == yte).sum()) / len(yte)
    majority = float(max(yte.mean(), 1.0 - yte.mean()))
    params = {f"param_{n}": p.detach().numpy() for n, p in net.state_dict().items()}
    return accuracy, majority, {"mean": mean, "std": std, **params}


def train_classifier(db: Database, model_id: str, task: str, cfg: TrainConfig = TrainConfig(),
                     out_dir: Path | None = None) -> dict[str, Any]:
    """Train, record and (with `out_dir`) save a classifier; the API's TRAIN answer."""
    data = load_labelled(db, model_id, task)
    n_test = int(data.is_test.sum())
    n_train = len(data.y) - n_test
    train_classes = set(data.y[~data.is_test].tolist())
    if n_train < MIN_TRAIN or n_test < MIN_TEST or len(train_classes) < 2:
        raise ValidationError(
            f"too few items labelled {task!r} for model {model_id!r}: {n_train} train / {n_test} held out "
            f"(need ≥{MIN_TRAIN} train with both labels and ≥{MIN_TEST} held out)")
    accuracy, majority, params = fit_and_score(data, cfg)
    now = time.time()
    with db.write() as conn:
        cid = conn.execute(classifiers.insert().values(
            task=task, model_id=model_id, kind=cfg.kind, accuracy=accuracy, majority_rate=majority,
            n_train=n_train, n_test=n_test, trained_at=now, stale=False)).inserted_primary_key[0]
        conn.execute(classifier_participants.insert(),
                     [{"classifier_id": cid, "participant_id": p} for p in sorted(data.participants)])
    classifier: dict[str, Any] = {"id": int(cid), "kind": cfg.kind, "stale": False, "trained_at": now}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"classifier-{int(cid)}.npz"
        np.savez(path, **params)
        classifier["path"] = str(path)
    return {"task": task, "model_id": model_id, "accuracy": accuracy, "majority_rate": majority,
            "n_train": n_train, "n_test": n_test, "classifier": classifier}
