"""Decoy codes that cohere: variants of the shipped `protocol.sparse_code.CodeDecoys`.

The decoy bank (`DecoyBank`) matches each fake's position and value to those of true
entries one entry at a time; the audit's learned attacker still finds the true support
because the true values cohere into ONE code of the encoder (its code model) and the fakes
do not. `CodeDecoys` draws the fakes as whole decoy codes from a Gaussian of the encoder's
dense codes (the model the attacker fits) and releases every entry with a public magnitude.
The research variants, for `python -m research.sparse_attack_bench --variant NAME-K`:

    coherent+canonical   what ships (`code_fakes`, card `sparse.magnitudes: "key"`)
    projected            each decoy put through the public decoder and encoder once
                         (c ← E_dense(D(top_k(c)))): the code of an image the decoder can
                         draw, as a true code is (approximately) the code of its decode
    +canonical           public magnitudes (the true ones in the key), as shipped
    +profile             instead: each decoy takes the TRUE code's magnitudes, in its own
                         order (nothing in the key; the true values cohere, the decoys'
                         do not)
    +poolN               draw N times as many decoys, keep those whose magnitude profile is
                         nearest the true code's
    +calibrated          decoys choose their positions by magnitude times a per-position
                         weight fitted so that each position holds decoy entries as often as
                         true ones (`calibrate_positions`)
    (neither)            each decoy scaled to the true code's norm

K (fakes per map) must be a multiple of k.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from audit.sparse_attacks import DenseEncoder
from protocol.errors import InvalidInputError
from protocol.sparse_code import (CodeDecoys, SparseSpec, _true_support, _with_profile, code_fakes, decoy_count,
                                  decoy_sampler, place_decoys, top_k)

Fakes = Callable[[np.ndarray, SparseSpec, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def calibrate_positions(decoys: CodeDecoys, dense: np.ndarray, k: int, n_dec: int, iters: int = 12,
                        rate: float = 0.2, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Weights (L, m) on the decoys' magnitudes when they choose their positions, fitted so
    that a position holds a decoy entry as often as a true one (training codes `dense`,
    N, L, m): w ← w · ((f_true + 1) / (f_decoy + 1))^rate, `iters` times on `n` codes."""
    rng = np.random.default_rng(seed)
    codes = dense[rng.permutation(len(dense))[:n]]
    L, m = codes.shape[1:]
    true_f = np.zeros((L, m))
    for c in codes:
        np.add.at(true_f, (np.arange(L)[:, None], _true_support(c, k)), 1.0)
    sample = decoy_sampler(decoys)
    w = np.ones((L, m), np.float32)
    for _ in range(iters):
        dec_f = np.zeros((L, m))
        for c in codes:
            pos, _ = place_decoys(c, sample(n_dec, rng).reshape(n_dec, L, m), k, lambda v: v, w)
            np.add.at(dec_f, (np.arange(L)[:, None], pos), 1.0 / n_dec)
        w = (w * ((true_f + 1.0) / (dec_f + 1.0)) ** rate).astype(np.float32)
    return w


def research_fakes(decoys: CodeDecoys, project: tuple[Any, DenseEncoder] | None = None, profile: str = "canonical",
                   pool: int = 1, weight: np.ndarray | None = None) -> Fakes:
    """A fake sampler for `ambiguate(..., fakes=...)` (module docstring). profile:
    'canonical' (the public magnitudes of `decoys`), 'true' or 'norm'."""
    sample = decoy_sampler(decoys)

    def draw(code: np.ndarray, spec: SparseSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        L, m, k = spec.L, spec.m, spec.k
        n_dec = decoy_count(spec)
        c = sample(n_dec * pool, rng).reshape(n_dec * pool, L, m)
        if project is not None:
            models, dense = project
            c = dense(np.round(models.decode(np.stack([top_k(x, k) for x in c])) * 255).astype(np.uint8))
        true_vals = np.take_along_axis(code, _true_support(code, k), axis=1)
        true_norm = float(np.linalg.norm(true_vals))
        true_mag = -np.sort(-np.abs(true_vals), axis=1)
        if pool > 1:  # keep the n_dec draws whose magnitude profile is nearest the true code's
            mags = -np.sort(-np.abs(c), axis=2)[:, :, :k]
            mags *= true_norm / np.maximum(np.linalg.norm(mags.reshape(len(c), -1), axis=1), 1e-12)[:, None, None]
            c = c[np.argsort(((mags - true_mag) ** 2).sum(axis=(1, 2)))[:n_dec]]
        if profile == "canonical":
            values = lambda v: _with_profile(v, decoys.profile)  # noqa: E731
        elif profile == "true":
            values = lambda v: _with_profile(v, true_mag)  # noqa: E731
        else:
            values = lambda v: v * (true_norm / max(float(np.linalg.norm(v)), 1e-12))  # noqa: E731
        return place_decoys(code, c, k, values, weight)

    if profile == "canonical":
        draw.profile = decoys.profile  # type: ignore[attr-defined]  # ambiguate releases the true entries with it
    return draw


def coherent_variant(name: str, models: Any, train_pixels: np.ndarray, n_dec: int = 1) -> tuple[Fakes, bool]:
    """NAME (without -K, module docstring) → (its fake sampler, whether the magnitudes are
    public: the spec then needs `magnitudes="key"`)."""
    base, *opts = name.split("+")
    pools = [o for o in opts if o.startswith("pool")]
    known = {"canonical", "profile", "calibrated"}
    if base not in ("coherent", "projected") or len(pools) > 1 or any(
            o not in known and not (o.startswith("pool") and o[4:].isdigit() and int(o[4:]) > 0) for o in opts) \
            or {"canonical", "profile"} <= set(opts):
        raise InvalidInputError(f"decoy variant {name!r}: expected coherent or projected, then optionally "
                                "+canonical or +profile, and +poolN")
    dense = DenseEncoder(models)
    codes = dense(train_pixels)
    k = models.card.sparse.k
    decoys = CodeDecoys.fit(codes, k)
    profile = "canonical" if "canonical" in opts else "true" if "profile" in opts else "norm"
    pool = int(pools[0][4:]) if pools else 1
    if base == "coherent" and profile == "canonical" and pool == 1 and "calibrated" not in opts:
        return code_fakes(decoys), True  # exactly what a device runs
    weight = calibrate_positions(decoys, codes, k, n_dec) if "calibrated" in opts else None
    return research_fakes(decoys, (models, dense) if base == "projected" else None, profile, pool, weight), \
        profile == "canonical"
