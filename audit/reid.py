"""Re-identification: does a release let one find other photos of the same person?"""

from __future__ import annotations

from typing import Any

import numpy as np


def reidentification(x: np.ndarray, ids: np.ndarray, ref_mean: np.ndarray | None = None) -> dict[str, Any]:
    """Rank-1 / rank-5 of finding another photo of the same person by cosine nearest
    neighbour. x (N, ...) of one split; ids (N,) (-1 unknown). Queries are photos whose
    identity has at least 2 photos; the gallery is every other photo of the split."""
    ids = np.asarray(ids)
    known = ids >= 0
    counts = {i: c for i, c in zip(*np.unique(ids[known], return_counts=True))}
    queries = np.flatnonzero(known & np.array([counts.get(i, 0) >= 2 for i in ids], dtype=bool))
    if len(queries) == 0:
        return {"rank1": None, "rank5": None, "n_queries": 0, "chance_rank1": None}
    f = x.reshape(len(x), -1).astype(np.float32)
    f = f - (f.mean(0) if ref_mean is None else ref_mean.reshape(-1))
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-8
    hits1, hits5 = [], []
    for i in range(0, len(queries), 512):
        q = queries[i:i + 512]
        sim = f[q] @ f.T
        sim[np.arange(len(q)), q] = -np.inf
        top = np.argsort(-sim, axis=1)[:, :5]
        same = ids[top] == ids[q][:, None]
        hits1.append(same[:, 0])
        hits5.append(same.any(1))
    chance = float(np.mean([(counts[ids[q]] - 1) / (len(x) - 1) for q in queries]))
    return {"rank1": float(np.concatenate(hits1).mean()), "rank5": float(np.concatenate(hits5).mean()),
            "n_queries": int(len(queries)), "n_identities": int(sum(c >= 2 for c in counts.values())),
            "chance_rank1": chance}
