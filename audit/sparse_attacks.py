"""Learned attacks on ambiguated sparse codes: support recovery and reconstruction by an
attacker without the key who holds everything public.

The attacker has the released encoder (model.onnx) and decoder (decoder.onnx), the
client's own sampler (`protocol.sparse_code.ambiguate`) and the training photos. He makes
(ambiguated code, true mask) pairs from training photos and learns which of the k'
non-zeros of a map are the k true ones:

    training photos ─► encoder ─► ambiguate (client's sampler) ─► (code, true mask)
      set A ─► per-position statistics of true entries: frequency, sign, magnitude law
               (a log-likelihood ratio of true vs fake per position and value bin)
      set B ─► stage 1: gradient-boosted trees (scikit-learn) on per-entry features
               (|value|/scale, sign, map, position, rank of |value| in its map, the
               set-A statistics at that position)
      set C ─► stage 2, the decoder in the loop: keep stage 1's top k per map, decode,
               re-encode the decoded image; trees on stage 1's score plus how the
               re-encoded code agrees with each entry (signed value, rank, distance)
    test code ─► stage 1 ─► decode/encode ─► stage 2 ─► top k per map ─► decoder

Reported: support precision (true entries among the k kept per map; chance k/k') for
the position prior alone, stage 1 and stage 2, and PSNR/SSIM (audit.quality) of their
decodes next to a random guess and the authorised decode; plus a grid of what the
attacker sees. The sparse verdicts require the best of them within 0.5 dB of the random
guess and within chance + 2 points of precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from audit.quality import image_quality
from protocol.sparse_code import AmbiguatedCode, ambiguate, released_scale, unpack_key

N_BINS = 8  # magnitude bins (per sign) of the per-position likelihood ratio
ATTACK_GRID = "sparse_attack_grid.png"


# --- per-position statistics -----------------------------------------------------------------
class PositionStats:
    """What set A says about true entries at each (map, position): their frequency among
    the non-zeros there, their sign, their magnitude, and a log-likelihood ratio of true vs
    fake per (sign, magnitude bin)."""

    def __init__(self, ambs: Sequence[AmbiguatedCode], masks: Sequence[np.ndarray], L: int, m: int,
                 chance: float) -> None:
        idx = np.stack([a.indices.astype(np.int64) for a in ambs])  # (n, L, k')
        rel = np.stack([_rel(a) for a in ambs])
        sgn = np.stack([a.values.astype(np.float32) > 0 for a in ambs])
        t = np.stack(masks)
        self.edges = np.quantile(rel, np.linspace(0, 1, N_BINS + 1)[1:-1])
        b = np.digitize(rel, self.edges) + N_BINS * sgn  # (n, L, k') in [0, 2·N_BINS)
        lmap = np.broadcast_to(np.arange(L)[None, :, None], idx.shape)
        flat = (lmap * m + idx).ravel()
        n_nz = np.bincount(flat, minlength=L * m).astype(np.float64)
        n_true = np.bincount(flat, weights=t.ravel(), minlength=L * m)
        a = 20.0  # prior strength towards chance where a position is rare
        self.freq = ((n_true + a * chance) / (n_nz + a)).reshape(L, m)
        self.sign = ((np.bincount(flat, weights=(t & sgn).ravel(), minlength=L * m) + 1)
                     / (n_true + 2)).reshape(L, m)
        rel_true = np.bincount(flat, weights=(rel * t).ravel(), minlength=L * m) / np.maximum(n_true, 1)
        rel2 = np.bincount(flat, weights=(rel ** 2 * t).ravel(), minlength=L * m) / np.maximum(n_true, 1)
        self.rel_mean = rel_true.reshape(L, m)
        self.rel_std = np.sqrt(np.maximum(rel2 - rel_true ** 2, 1e-4)).reshape(L, m)
        nb = 2 * N_BINS
        cell = flat * nb + b.ravel()
        ct = np.bincount(cell, weights=t.ravel(), minlength=L * m * nb).reshape(L, m, nb)
        cf = np.bincount(cell, weights=(~t).ravel(), minlength=L * m * nb).reshape(L, m, nb)
        self.llr = np.log((ct + 1) / (ct.sum(-1, keepdims=True) + nb)) - np.log((cf + 1) / (cf.sum(-1, keepdims=True) + nb))

    def features(self, amb: AmbiguatedCode) -> np.ndarray:
        """Per-entry features of one code: (L·k', F) float32."""
        idx = amb.indices.astype(np.int64)
        L, kp = idx.shape
        v = amb.values.astype(np.float32)
        rel = _rel(amb)
        sgn = v > 0
        lm = np.arange(L)[:, None]
        b = np.digitize(rel, self.edges) + N_BINS * sgn
        rank = np.argsort(np.argsort(-np.abs(v), axis=1), axis=1) / kp
        p_sign = self.sign[lm, idx]
        f = [np.broadcast_to(lm, idx.shape), idx, rel, sgn, rank,
             np.log(self.freq[lm, idx] / (1 - self.freq[lm, idx])),
             np.where(sgn, p_sign, 1 - p_sign),
             (rel - self.rel_mean[lm, idx]) / self.rel_std[lm, idx],
             self.llr[lm, idx, b]]
        return np.stack([np.asarray(x, np.float32).ravel() for x in f], axis=1)


def _rel(amb: AmbiguatedCode) -> np.ndarray:
    """|values| over the photo's released scale (its largest released magnitude), (L, k')."""
    return np.abs(amb.values.astype(np.float32)) / max(float(released_scale(amb)), 1e-12)


def _loop_features(amb: AmbiguatedCode, recoded: np.ndarray) -> np.ndarray:
    """How the re-encoded decode of a support guess, (L, m), agrees with each entry: (L·k', 3)."""
    idx = amb.indices.astype(np.int64)
    lm = np.arange(idx.shape[0])[:, None]
    c = recoded / max(float(np.abs(recoded).max()), 1e-12)
    at = c[lm, idx]
    rank_c = np.argsort(np.argsort(-np.abs(recoded), axis=1), axis=1)[lm, idx] / recoded.shape[1]
    v = amb.values.astype(np.float32) / max(float(released_scale(amb)), 1e-12)
    return np.stack([(np.sign(v) * at).ravel(), rank_c.ravel(), np.abs(v - at).ravel()], axis=1).astype(np.float32)


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """bool (L, k'): the k highest scores per map."""
    order = np.argsort(-scores, axis=1, kind="stable")
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order[:, :k], True, axis=1)
    return mask


def _fit_trees(x: np.ndarray, y: np.ndarray, seed: int, max_rows: int, quick: bool) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        keep = rng.choice(len(x), max_rows, replace=False)
        x, y = x[keep], y[keep]
    return HistGradientBoostingClassifier(max_iter=30 if quick else 200, learning_rate=0.1, max_leaf_nodes=63,
                                          early_stopping=not quick and len(x) > 10000,
                                          random_state=seed).fit(x, y)


def _scores(model: Any, x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    p = np.clip(model.predict_proba(x)[:, 1], 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).reshape(shape)


# --- the attack ------------------------------------------------------------------------------
def learned_support_attack(models: Any, card: Any, train_pixels: np.ndarray, test_ambs: Sequence[AmbiguatedCode],
                           test_keys: Sequence[bytes], ref: np.ndarray, rng: np.random.Generator, *,
                           baseline: dict[str, Any], out_dir: Path | None = None, quick: bool = False,
                           seed: int = 0, max_train: int = 6000) -> dict[str, Any]:
    """Run the learned attacker (module docstring) on the test codes.

    models: audit.sparse.OnnxPair; train_pixels uint8 (N, H, W, 3); test_ambs/test_keys:
    the audit's ambiguated test codes and their keys (the keys only score the attack);
    ref: test photos float (N, H, W, 3) in [0, 1]; baseline: {"random": image_quality of
    the random guess, "authorised": of the authorised decode}. Returns the figures."""
    from audit.sparse import dense_from_mask

    sp = card.sparse
    L, m, k, kp = sp.L, sp.m, sp.k, sp.k_prime
    chance = k / kp
    n = min(len(train_pixels), max_train)
    if n < 6:
        return {"measured": False, "reason": f"{len(train_pixels)} training photos (need 6)"}
    order = rng.permutation(len(train_pixels))[:n]
    codes = models.encode(train_pixels[order])
    pairs = [ambiguate(c, sp, rng) for c in codes]
    ambs = [a for a, _ in pairs]
    masks = [unpack_key(key)[0] for _, key in pairs]
    a_end, b_end = n // 2, (3 * n) // 4  # A: statistics, B: stage 1, C: stage 2
    stats = PositionStats(ambs[:a_end], masks[:a_end], L, m, chance)
    shape = (L, kp)
    max_rows = 200_000 if quick else 1_500_000

    xb = np.concatenate([stats.features(a) for a in ambs[a_end:b_end]])
    yb = np.concatenate([t.ravel() for t in masks[a_end:b_end]])
    stage1 = _fit_trees(xb, yb, seed, max_rows, quick)

    def loop(amb_list: Sequence[AmbiguatedCode], s1: list[np.ndarray]) -> np.ndarray:
        """Decode each code's stage-1 top-k, re-encode: (N, L, m)."""
        dense = np.stack([dense_from_mask(a, top_k_mask(s, k), m) for a, s in zip(amb_list, s1)])
        imgs = models.decode(dense)
        return models.encode(np.clip(imgs * 255.0 + 0.5, 0, 255).astype(np.uint8))

    c_ambs = ambs[b_end:]
    c_f1 = [stats.features(a) for a in c_ambs]
    c_s1 = [_scores(stage1, f, shape) for f in c_f1]
    c_re = loop(c_ambs, c_s1)
    xc = np.concatenate([np.concatenate([f, s.reshape(-1, 1), _loop_features(a, r)], axis=1)
                         for f, s, a, r in zip(c_f1, c_s1, c_ambs, c_re)])
    yc = np.concatenate([t.ravel() for t in masks[b_end:]])
    stage2 = _fit_trees(xc, yc, seed + 1, max_rows, quick)

    # the test codes
    truth = [unpack_key(key)[0] for key in test_keys]
    t_f1 = [stats.features(a) for a in test_ambs]
    t_s1 = [_scores(stage1, f, shape) for f in t_f1]
    t_re = loop(test_ambs, t_s1)
    t_s2 = [_scores(stage2, np.concatenate([f, s.reshape(-1, 1), _loop_features(a, r)], axis=1), shape)
            for f, s, a, r in zip(t_f1, t_s1, test_ambs, t_re)]
    lm = np.arange(L)[:, None]
    guesses = {
        "position_prior": [top_k_mask(stats.freq[lm, a.indices.astype(np.int64)], k) for a in test_ambs],
        "per_entry_trees": [top_k_mask(s, k) for s in t_s1],
        "decoder_in_the_loop": [top_k_mask(s, k) for s in t_s2],
    }
    out: dict[str, Any] = {"measured": True, "chance": chance, "n_train_codes": n,
                           "sets": {"statistics": a_end, "stage1": b_end - a_end, "stage2": n - b_end},
                           "n_test": len(test_ambs), "precision": {}, "reconstruction": {}}
    recon = {}
    for name, g in guesses.items():
        out["precision"][name] = float(np.mean([(p & t).sum() / t.sum() for p, t in zip(g, truth)]))
        recon[name] = models.decode(np.stack([dense_from_mask(a, p, m) for a, p in zip(test_ambs, g)]))
        out["reconstruction"][name] = image_quality(ref, recon[name])
    best = max(out["reconstruction"], key=lambda s: out["reconstruction"][s]["psnr"])
    rg = baseline["random"]["psnr"]
    out.update(
        best=best, best_precision=max(out["precision"].values()), random_guess=baseline["random"],
        authorised=baseline["authorised"],
        psnr_over_random=out["reconstruction"][best]["psnr"] - rg,
        within_0_5db_of_random_guess=out["reconstruction"][best]["psnr"] - rg <= 0.5,
        precision_within_chance_plus_2pts=max(out["precision"].values()) <= chance + 0.02,
        features={"stage1": ["map", "position", "|value|/scale", "sign", "rank in map", "position frequency (logit)",
                             "sign agreement", "magnitude z at position", "log-likelihood ratio at position"],
                  "stage2": ["stage 1", "stage-1 score", "re-encoded value × sign", "re-encoded rank",
                             "|value − re-encoded value|"]})
    if out_dir is not None and "images" in baseline:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_attack_grid([ref, *baseline["images"], *(recon[n] for n in guesses)], Path(out_dir) / ATTACK_GRID)
        out["grid"] = ATTACK_GRID
        out["grid_rows"] = ["original", *baseline.get("image_names", []), *guesses]
    return out


def save_attack_grid(rows: Sequence[np.ndarray], path: Path, n: int = 8) -> None:
    """Rows of (N, H, W, 3) float images in [0, 1] → one PNG of n columns."""
    from PIL import Image

    tiles = [np.concatenate(list(r[:n]), axis=1) for r in rows]
    Image.fromarray((np.clip(np.concatenate(tiles, axis=0), 0, 1) * 255).round().astype(np.uint8)).save(path)


def format_attack_table(att: dict[str, Any]) -> str:
    """Markdown table of the learned attack (report.md, docs)."""
    if not att.get("measured"):
        return f"Learned support attack: not measured ({att.get('reason')})."
    names = {"position_prior": "per-position frequency of true entries alone",
             "per_entry_trees": "per-entry gradient boosting (stage 1)",
             "decoder_in_the_loop": "stage 1 + decoder in the loop (stage 2)"}
    lines = ["| attacker (no key) | support precision | PSNR (dB) | SSIM |", "| --- | --- | --- | --- |",
             f"| chance / random guess | {att['chance']:.3f} | {att['random_guess']['psnr']:.2f} | "
             f"{att['random_guess']['ssim']:.3f} |"]
    for key, label in names.items():
        r = att["reconstruction"][key]
        lines.append(f"| {label} | {att['precision'][key]:.3f} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.3f} |")
    lines.append(f"| authorised decode (with the key) | 1.000 | {att['authorised']['psnr']:.2f} | "
                 f"{att['authorised']['ssim']:.3f} |")
    return "\n".join(lines)
