"""Downstream training: the collector's own classifier for one task on stored features.

Items of one model only (features of different models live in different spaces, so they
are never mixed). Train/held-out split by participant: the held-out accuracy is measured on
people the classifier never saw, so it is not inflated by one person's look (or camera, or
light) on both sides. The held-out participants are chosen by hashing their ids (stable
across runs, independent of upload order): about 20% of them. torch is imported inside the
job (`pric-collector worker` or `train`): the serving process never imports it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

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
    """X: float32 (N, D) flattened features; y: int64 (N,); is_test: bool (N,); owners:
    the participant of each row (N,); held_out: the participants whose items are held out
    (both optional for sets made elsewhere, e.g. research.downstream's photo sets)."""

    X: np.ndarray
    y: np.ndarray
    is_test: np.ndarray
    participants: set[str]
    owners: np.ndarray | None = None
    held_out: set[str] = field(default_factory=set)


class Interrupted(Exception):
    """Training stopped between epochs because `should_stop` said so (worker stopping, lease lost)."""


def _rank(participant_id: str) -> bytes:
    return hashlib.sha256(f"pric-held-out/{participant_id}".encode()).digest()


def held_out_participants(items_per_participant: dict[str, int]) -> set[str]:
    """The participants whose items are held out: in the order of a hash of their ids,
    TEST_PERCENT% of them (at least one), more while they hold fewer than MIN_TEST items,
    but never all of them (none when there is only one). Deterministic: the same
    participants give the same split, whatever the order of uploads."""
    ranked = sorted(items_per_participant, key=_rank)
    want = max(1, round(len(ranked) * TEST_PERCENT / 100))
    chosen: list[str] = []
    n_items = 0
    for pid in ranked[:-1]:  # at least one participant stays on the training side
        if len(chosen) >= want and n_items >= MIN_TEST:
            break
        chosen.append(pid)
        n_items += items_per_participant[pid]
    return set(chosen)


def item_vector(arrays: dict[str, np.ndarray], card: ModelCard) -> np.ndarray:
    """One stored item → flat float32 (D,); a sparse code is decoded 'as is' to (L, m)."""
    if card.kind == "sparse_code":
        assert card.sparse is not None
        dense = code_from_arrays(arrays, card.sparse).to_dense(card.sparse.m)
        return dense.reshape(-1)
    return arrays[card.output.name].astype(np.float32).reshape(-1)


def load_labelled(db: Database, model_id: str, task: str) -> LabelledSet:
    card = recorded_card(db, model_id)
    xs, ys, owners = [], [], []
    with db.read() as conn:
        rows = conn.execute(select(items.c.participant_id, items.c.item_id, items.c.arrays, items.c.array_names, items.c.labels)
                            .where(items.c.model_id == model_id).order_by(items.c.id))
        for r in rows:
            label = json.loads(r.labels).get(task)
            if label is None:
                continue
            xs.append(item_vector(unpack_arrays(r.arrays, r.array_names), card))
            ys.append(int(label))
            owners.append(r.participant_id)
    dim = int(np.prod(card.output.shape)) if card.kind == "features" else 0
    X = np.stack(xs) if xs else np.zeros((0, dim), np.float32)
    counts: dict[str, int] = {}
    for pid in owners:
        counts[pid] = counts.get(pid, 0) + 1
    held_out = held_out_participants(counts)
    owner_arr = np.asarray(owners, dtype=object)
    is_test = np.asarray([pid in held_out for pid in owners], bool)
    return LabelledSet(X=X, y=np.asarray(ys, np.int64), is_test=is_test, participants=set(counts), owners=owner_arr,
                       held_out=held_out)


def fit_and_score(data: LabelledSet, cfg: TrainConfig, should_stop: Callable[[], bool] | None = None,
                  ) -> tuple[float, float, dict[str, np.ndarray]]:
    """Train on the train part, score on the held-out part; `should_stop` is asked between
    epochs (Interrupted when it answers True). Runs in `pric-collector worker` or the
    `train` command, never in the serving process (which never imports torch).

    Returns (accuracy, majority rate of the held-out labels, parameters as arrays).
    """
    import torch

    # One intra-op thread: these problems are tiny, and OpenMP workers spinning on a busy
    # machine made a 0.1 s fit take a minute. Restored after the job (process-global).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_score(torch, data, cfg, should_stop or (lambda: False))
    finally:
        torch.set_num_threads(threads)


def _fit_and_score(torch, data: LabelledSet, cfg: TrainConfig,  # noqa: ANN001
                   should_stop: Callable[[], bool]) -> tuple[float, float, dict[str, np.ndarray]]:
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
        if should_stop():
            raise Interrupted("training stopped before it finished")
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


@dataclass
class Trained:
    """A fitted classifier, not yet recorded."""

    task: str
    model_id: str
    cfg: TrainConfig
    accuracy: float
    majority: float
    n_train: int
    n_test: int
    participants: set[str]
    n_test_participants: int
    params: dict[str, np.ndarray]


def fit_classifier(db: Database, model_id: str, task: str, cfg: TrainConfig = TrainConfig(),
                   should_stop: Callable[[], bool] | None = None) -> Trained:
    """Load the labelled items and fit; nothing is written (see record_classifier)."""
    data = load_labelled(db, model_id, task)
    n_test = int(data.is_test.sum())
    n_train = len(data.y) - n_test
    train_classes = set(data.y[~data.is_test].tolist())
    n_people = len(data.participants)
    if n_train < MIN_TRAIN or n_test < MIN_TEST or len(train_classes) < 2:
        raise ValidationError(
            f"too few items labelled {task!r} for model {model_id!r}: {n_train} train / {n_test} held out, from "
            f"{n_people - len(data.held_out)} / {len(data.held_out)} participants (need ≥{MIN_TRAIN} train with "
            f"both labels and ≥{MIN_TEST} held out; the held-out items are other participants', so at least 2)")
    accuracy, majority, params = fit_and_score(data, cfg, should_stop)
    return Trained(task=task, model_id=model_id, cfg=cfg, accuracy=accuracy, majority=majority, n_train=n_train,
                   n_test=n_test, participants=data.participants, n_test_participants=len(data.held_out),
                   params=params)


def record_classifier(conn: Connection, trained: Trained, out_dir: Path | None = None) -> dict[str, Any]:
    """Record a fitted classifier in the caller's write transaction (and with `out_dir`
    save its parameters; a file left by a transaction that then rolled back is overwritten
    by the classifier that gets its id); the job's result."""
    now = time.time()
    cfg = trained.cfg
    cid = conn.execute(classifiers.insert().values(
        task=trained.task, model_id=trained.model_id, kind=cfg.kind, accuracy=trained.accuracy,
        majority_rate=trained.majority, n_train=trained.n_train, n_test=trained.n_test, trained_at=now,
        stale=False)).inserted_primary_key[0]
    conn.execute(classifier_participants.insert(),
                 [{"classifier_id": cid, "participant_id": p} for p in sorted(trained.participants)])
    classifier: dict[str, Any] = {"id": int(cid), "kind": cfg.kind, "stale": False, "trained_at": now}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"classifier-{int(cid)}.npz"
        np.savez(path, **trained.params)
        classifier["path"] = str(path)
    return {"task": trained.task, "model_id": trained.model_id, "accuracy": trained.accuracy,
            "majority_rate": trained.majority, "n_train": trained.n_train, "n_test": trained.n_test,
            "n_train_participants": len(trained.participants) - trained.n_test_participants,
            "n_test_participants": trained.n_test_participants, "split": "by participant", "classifier": classifier}


def train_classifier(db: Database, model_id: str, task: str, cfg: TrainConfig = TrainConfig(),
                     out_dir: Path | None = None) -> dict[str, Any]:
    """Fit, record and (with `out_dir`) save a classifier, outside the jobs queue."""
    trained = fit_classifier(db, model_id, task, cfg)
    with db.write() as conn:
        return record_classifier(conn, trained, out_dir)
