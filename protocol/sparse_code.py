"""Sparse codes with ambiguation (ICASSP'20 scheme), numpy only.

A `sparse_code` model outputs, per photo, a dense code (L, m) with k non-zeros per code
map (top-k by magnitude). Before upload the owner adds k_fake *fake* non-zeros per map at
random zero positions; the public code then has k' = k + k_fake non-zeros per map and the
secret key is which k of those k' are true.

Fake values are drawn so that their magnitudes are exchangeable with the true kept
values of that map (see `sample_fake_values`: a Bayesian bootstrap over the k+1 gaps
between the sorted true magnitudes, tails included, so the largest and the smallest
magnitude of a map are true only with probability k/k'; signs with the true map's sign
rate). The reference code drew them m/k times too large, which lets an attacker keep the
k smallest magnitudes and recover most of the key; this module does not.

Key format (version 1), bytes:
    b"PK" | version u8 | L u16 | k' u16 | k u16 | fingerprint 8 bytes | packbits(mask (L, k'))
The fingerprint is sha256(indices ‖ values)[:8] of the ambiguated code, so a key applied
to another photo's code is refused instead of decoding garbage.
Version 2 (cards with `sparse.magnitudes: "key"`, whose public code shows every entry with
a public magnitude, see `CodeDecoys`) appends the true magnitudes:
    ... | packbits(mask) | value_bits u8 | scale float16 big-endian | bit-packed, MSB first,
    zero-padded: per map, per true entry in increasing position, a (value_bits - 1)-bit
    level on the grid of `scale` (the largest true magnitude); the signs are public.

Compact true code (version 1): what a key holder keeps of one photo, and the code's rate.
    version u8 | [scale float16, big-endian: only with value_bits]
    | bit-packed, most significant bit first, zero-padded to whole bytes:
        the L supports as ONE integer R = Σ_l rank_l · C(m, k)^l (rank_l: the map's sorted
        k positions in the combinatorial number system), in ceil(L·log2 C(m, k)) bits;
        then per map, per non-zero in increasing position: value_bits bits, either a sign
        bit and a (value_bits - 1)-bit magnitude level q (magnitude
        scale · ((q + 1) / 2^(value_bits-1))^1.5: finer steps near zero, where most kept
        magnitudes lie; scale = the photo's largest released magnitude, see `ambiguate`),
        or, without value_bits, the 16 bits of a float16 value.
See `pack_compact` / `unpack_compact`; `quantise_code` puts a code on such a grid, and
`ambiguate` puts true and fake values on one grid when the card sets `sparse.value_bits`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.errors import KeyMismatchError, WireFormatError
from protocol.model_card import VALUE_BITS_RANGE, SparseSpec

KEY_MAGIC = b"PK"
KEY_VERSION = 1
KEY_VERSION_MAGNITUDES = 2
_HEADER = struct.Struct(">2sBHHH8s")
INDEX_DTYPE = np.uint16
VALUE_DTYPE = np.float16
COMPACT_VERSION = 1
COMPAND_POWER = 1.5  # magnitude = scale · level^1.5 (measured: better than uniform levels at 4-6 bits)


class SparseCodeError(WireFormatError):
    """A sparse code is malformed (shape, index range, ordering); HTTP 400."""

    code = "bad_sparse_code"


@dataclass(frozen=True)
class AmbiguatedCode:
    """Public part: per code map, k' sorted positions and their values."""

    indices: np.ndarray  # uint16 (L, k')
    values: np.ndarray   # float16 (L, k')

    def fingerprint(self) -> bytes:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.indices, dtype=INDEX_DTYPE).tobytes())
        h.update(np.ascontiguousarray(self.values, dtype=VALUE_DTYPE).tobytes())
        return h.digest()[:8]

    def to_dense(self, m: int) -> np.ndarray:
        """Decode 'as is' (all k' non-zeros, no key): float32 (L, m)."""
        L = self.indices.shape[0]
        dense = np.zeros((L, m), dtype=np.float32)
        np.put_along_axis(dense, self.indices.astype(np.int64), self.values.astype(np.float32), axis=1)
        return dense


def os_rng() -> np.random.Generator:
    """A generator seeded from the OS: the client never ambiguates with a fixed seed."""
    return np.random.default_rng(secrets.randbits(128))


def top_k(code: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest magnitudes per row of (L, m), zero the rest."""
    idx = np.argpartition(-np.abs(code), k - 1, axis=1)[:, :k]
    out = np.zeros_like(code, dtype=np.float32)
    np.put_along_axis(out, idx, np.take_along_axis(code, idx, axis=1).astype(np.float32), axis=1)
    return out


def _true_support(code: np.ndarray, k: int) -> np.ndarray:
    """(L, k) positions of the k largest magnitudes per map."""
    return np.argpartition(-np.abs(code), k - 1, axis=1)[:, :k]


def sample_fake_values(true_values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n fake values for one code map from its k true values (1-D array).

    Magnitudes: the k sorted true magnitudes x_1 <= ... <= x_k cut the line into k+1
    gaps (below x_1, between neighbours, above x_k). For k i.i.d. draws of any
    continuous law, the probability masses of those gaps are Dirichlet(1, ..., 1); the
    sampler draws the masses from that law once per map, then each fake's gap from them
    (a Bayesian bootstrap with tails). So the rank of every fake among the true values
    has exactly the law of the rank of one more true value: ranking magnitudes, the
    largest and the smallest included, recovers the true support only at chance k/k'.
    Within a gap the magnitude is uniform between its ends; below x_1 the lower end is
    x_1 - (x_2 - x_1), not below x_1 / 2; above x_k an exponential tail whose scale is
    the Rényi estimate from the top spacings, mean of i·(x_{k-i+1} - x_{k-i}), i <= 5.
    Signs: + with the true map's rate of positive values.
    """
    tv = np.asarray(true_values, dtype=np.float64).ravel()
    mags = np.sort(np.abs(tv))
    k = mags.size
    if k == 0:
        raise ValueError("sample_fake_values needs at least one true value")
    if k == 1:
        fake_mag = mags[0] * rng.uniform(0.5, 1.5, size=n)
    else:
        gap = rng.choice(k + 1, size=n, p=rng.dirichlet(np.ones(k + 1)))
        v = rng.random(n)
        fake_mag = np.empty(n)
        inner = (gap > 0) & (gap < k)
        lo_i = gap[inner] - 1
        fake_mag[inner] = mags[lo_i] + v[inner] * (mags[lo_i + 1] - mags[lo_i])
        low = gap == 0
        low_end = max(mags[0] - (mags[1] - mags[0]), 0.5 * mags[0])
        fake_mag[low] = low_end + v[low] * (mags[0] - low_end)
        high = gap == k
        j = min(k - 1, 5)
        spacings = np.diff(mags)[::-1][:j]  # x_k - x_{k-1}, x_{k-1} - x_{k-2}, ...
        scale = float(np.mean(np.arange(1, j + 1) * spacings))
        fake_mag[high] = mags[-1] + scale * -np.log1p(-v[high])
    p_pos = float(np.mean(tv > 0))
    signs = np.where(rng.random(n) < p_pos, 1.0, -1.0)
    return (fake_mag * signs).astype(np.float32)


FakeSampler = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def ambiguate(
    code: np.ndarray, spec: SparseSpec, rng: np.random.Generator | None = None,
    fake_values: FakeSampler | None = None, fakes: "FakeEntries | None" = None,
) -> tuple[AmbiguatedCode, bytes]:
    """Dense code (L, m) → (public ambiguated code, secret key bytes).

    With `spec.value_bits` the released values are quantised: the fakes are drawn from the
    true values, then true and fake values alike are put on ONE grid whose scale is the
    photo's largest released magnitude, true or fake (`released_scale`). The same monotone
    rounding of exchangeable draws keeps them exchangeable, and the grid reveals nothing
    the released values did not already show. (A grid scaled to the largest TRUE magnitude
    would publish a bound on the true values: the fakes above it would have to be clipped
    onto the top level, and an attacker keeping the k largest magnitudes then decoded
    0.4 dB closer to the photo than a random guess on sparse-celeba@4's test photos.)
    A key holder recovers the compact true code with
    `pack_compact(disambiguate(code, key, m), k, value_bits, scale=released_scale(code))`.
    `fake_values(true_values, n, rng)` draws a map's fake values (default and on every
    device: `sample_fake_values`; research runners compare other samplers through it).
    `fakes(code, spec, rng)` → (positions, values), each (L, k_fake), replaces both the
    uniform fake positions and `fake_values` (e.g. `bank_fakes(bank)`)."""
    rng = rng or os_rng()
    fake_values = fake_values or sample_fake_values
    code = np.asarray(code, dtype=np.float32)
    if code.shape != (spec.L, spec.m):
        raise SparseCodeError(f"code has shape {code.shape}, expected {(spec.L, spec.m)}")
    if getattr(spec, "magnitudes", None) == "key":
        return _ambiguate_public_magnitudes(code, spec, rng, fakes)
    kp = spec.k_prime
    indices = np.empty((spec.L, kp), dtype=np.int64)
    values = np.empty((spec.L, kp), dtype=np.float32)
    mask = np.empty((spec.L, kp), dtype=bool)
    true_pos = _true_support(code, spec.k)
    drawn = fakes(code, spec, rng) if fakes is not None else None
    for l in range(spec.L):
        t = true_pos[l]
        tv = code[l, t]
        if drawn is not None:
            f, fv = drawn[0][l], drawn[1][l]
        else:
            free = np.setdiff1d(np.arange(spec.m), t, assume_unique=True)
            f = rng.choice(free, size=spec.k_fake, replace=False)
            fv = fake_values(tv, spec.k_fake, rng)
        pos = np.concatenate([t, f])
        val = np.concatenate([tv, fv])
        is_true = np.concatenate([np.ones(spec.k, bool), np.zeros(spec.k_fake, bool)])
        order = np.argsort(pos, kind="stable")
        indices[l], values[l], mask[l] = pos[order], val[order], is_true[order]
    if spec.value_bits is not None:
        values = snap_to_grid(values, _scale(values), spec.value_bits)
    amb = AmbiguatedCode(indices=indices.astype(INDEX_DTYPE), values=values.astype(VALUE_DTYPE))
    return amb, pack_key(mask, spec.k, amb.fingerprint())


@dataclass(frozen=True)
class DecoyBank:
    """What the true entries of real photos look like, per (map, position), built from the
    public training split and shipped with a model (`decoys.npz`):

    freq    float32 (L, m): share of training codes whose true support holds the position
    values  float16 (L, m, S): signed values of true entries seen there, over their photo's
            largest true magnitude (up to S per position; `count` of them valid)
    count   uint16 (L, m)

    `bank_fakes` draws fakes from it so that, position by position, a released entry is
    true with the same probability k/k' everywhere and its value follows the law of true
    values at that position (the uniform sampler put fakes on every free position alike,
    and the per-position frequency of true entries alone then picked 3.5x chance)."""

    freq: np.ndarray
    values: np.ndarray
    count: np.ndarray

    def save(self, path: "str | object") -> None:
        np.savez(path, freq=self.freq.astype(np.float32), values=self.values.astype(np.float16),
                 count=self.count.astype(np.uint16))

    @classmethod
    def load(cls, path: "str | object", spec: SparseSpec) -> "DecoyBank":
        """Read a bank (allow_pickle=False); SparseCodeError (one line) if it does not fit `spec`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                bank = cls(freq=np.asarray(z["freq"], np.float32), values=np.asarray(z["values"], np.float16),
                           count=np.asarray(z["count"], np.uint16))
        except (OSError, KeyError, ValueError) as exc:
            raise SparseCodeError(f"{path}: not a decoy bank (npz with freq, values, count): {exc}") from None
        L, m = spec.L, spec.m
        if bank.freq.shape != (L, m) or bank.count.shape != (L, m) or bank.values.ndim != 3 \
                or bank.values.shape[:2] != (L, m):
            raise SparseCodeError(f"{path}: decoy bank shapes {bank.freq.shape}/{bank.values.shape}/"
                                  f"{bank.count.shape} do not fit L={L}, m={m}")
        if not (np.all(np.isfinite(bank.freq)) and np.all((bank.freq >= 0) & (bank.freq <= 1))
                and np.all(np.isfinite(bank.values.astype(np.float32)))
                and np.all(np.abs(bank.values.astype(np.float32)) <= 1)
                and np.all(bank.count <= bank.values.shape[2])):
            raise SparseCodeError(f"{path}: decoy bank has frequencies outside [0, 1], values outside [-1, 1] "
                                  "or counts beyond its sample size")
        return bank


def build_decoy_bank(codes: np.ndarray, k: int, samples: int = 64, seed: int = 0) -> DecoyBank:
    """Dense training codes (N, L, m) → their DecoyBank (top-k support per map; up to
    `samples` values per position, chosen uniformly by a seeded generator)."""
    codes = np.asarray(codes, dtype=np.float32)
    n, L, m = codes.shape
    rng = np.random.default_rng(seed)
    freq = np.zeros((L, m), np.float64)
    values = np.zeros((L, m, samples), np.float16)
    count = np.zeros((L, m), np.int64)
    seen = np.zeros((L, m), np.int64)
    for i in rng.permutation(n):
        c = codes[i]
        scale = max(float(np.abs(c).max()), 1e-12)
        pos = _true_support(c, k)
        for l in range(L):
            for p in pos[l]:
                freq[l, p] += 1
                seen[l, p] += 1
                slot = count[l, p] if count[l, p] < samples else rng.integers(0, seen[l, p])  # reservoir
                if slot < samples:
                    values[l, p, slot] = c[l, p] / scale
                    count[l, p] = min(count[l, p] + 1, samples)
    return DecoyBank(freq=(freq / max(n, 1)).astype(np.float32), values=values, count=count.astype(np.uint16))


def bank_fakes(bank: DecoyBank) -> "Callable[[np.ndarray, SparseSpec, np.random.Generator], tuple[np.ndarray, np.ndarray]]":
    """A fake-entry sampler for `ambiguate(..., fakes=bank_fakes(bank))`: per map, the
    k_fake fake positions are drawn among the free positions with weights
    f_p / (1 - f_p) (f_p: the bank's frequency of true entries at p), so that a position
    holds a fake about k_fake/k times as often as it holds a true entry, and each fake's
    value is one of the true values seen at its position, times the photo's largest true
    magnitude (positions never seen true get a true value of the map, resampled)."""

    def draw(code: np.ndarray, spec: SparseSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        true_pos = _true_support(code, spec.k)
        scale = float(np.abs(code).max())
        pos_out = np.empty((spec.L, spec.k_fake), np.int64)
        val_out = np.empty((spec.L, spec.k_fake), np.float32)
        for l in range(spec.L):
            free = np.setdiff1d(np.arange(spec.m), true_pos[l], assume_unique=True)
            f = np.clip(bank.freq[l, free].astype(np.float64), 1e-4, 0.9)
            w = f / (1.0 - f)
            p = rng.choice(free, size=spec.k_fake, replace=False, p=w / w.sum())
            cnt = bank.count[l, p].astype(np.int64)
            pick = (rng.random(p.size) * np.maximum(cnt, 1)).astype(np.int64)
            v = bank.values[l, p, pick].astype(np.float32) * scale
            none = cnt == 0
            if np.any(none):
                v[none] = rng.choice(code[l, true_pos[l]], size=int(none.sum()))
            pos_out[l], val_out[l] = p, v
        return pos_out, val_out

    return draw


FakeEntries = Callable[[np.ndarray, SparseSpec, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# --- decoy codes: whole codes from a Gaussian model of the encoder's dense codes ----------
def fit_code_gaussian(dense: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Dense codes (N, L, m) before the top-k → the Gaussian of rank `rank` that models
    them: (mean (L·m,), basis (L·m, r) with c = mean + basis · z, z ~ N(0, I), the variance
    left out per coordinate, the share of the variance kept). The model builder fits it on
    the training split for `CodeDecoys`; the audit's attacker fits the same on his photos."""
    x = np.asarray(dense, dtype=np.float64).reshape(len(dense), -1)
    mu = x.mean(0)
    ev, vec = np.linalg.eigh(np.cov(x, rowvar=False))
    ev, vec = np.clip(ev[::-1], 0, None), vec[:, ::-1]
    r = min(rank, len(ev))
    basis = vec[:, :r] * np.sqrt(ev[:r])
    # the variance left out per coordinate, at least 1e-4 of the mean (a full-rank fit leaves none)
    resid = float(ev[r:].sum() / len(ev)) + 1e-4 * float(ev.mean())
    return mu, basis, resid, float(ev[:r].sum() / max(ev.sum(), 1e-30))


@dataclass(frozen=True)
class CodeDecoys:
    """Decoys that cohere as a true code does, shipped with a model (`decoys.npz`) whose
    card sets `sparse.magnitudes: "key"`; built from the training split's dense codes:

    mu       float32 (L·m,): mean dense code (before the encoder's top-k)
    basis    (L·m, r): the Gaussian's factor (`fit_code_gaussian`; float16 in the file)
    resid    float32 (): variance added per coordinate
    profile  float32 (L, k): the public magnitudes, largest first: each map's k largest
             training magnitudes, averaged over photos

    The k_fake = n·k fakes of a photo are n decoy codes drawn whole (all L maps) from the
    Gaussian, each keeping its k largest magnitudes per map among the positions still free.
    Every released entry, true or fake, shows the profile's magnitude of its rank within
    its own code and its own sign, so per entry the values say nothing, and the true
    magnitudes travel in the key (version 2). Measured against per-entry decoys (the bank)
    and uniform fakes: docs/results-sparse.md."""

    mu: np.ndarray
    basis: np.ndarray
    resid: float
    profile: np.ndarray

    def save(self, path: "str | object") -> None:
        np.savez(path, mu=self.mu.astype(np.float32), basis=self.basis.astype(np.float16),
                 resid=np.float32(self.resid), profile=self.profile.astype(np.float32))

    @classmethod
    def load(cls, path: "str | object", spec: SparseSpec) -> "CodeDecoys":
        """Read decoys (allow_pickle=False); SparseCodeError (one line) if they do not fit `spec`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                d = cls(mu=np.asarray(z["mu"], np.float32), basis=np.asarray(z["basis"], np.float32),
                        resid=float(z["resid"]), profile=np.asarray(z["profile"], np.float32))
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise SparseCodeError(f"{path}: not decoy codes (npz with mu, basis, resid, profile): {exc}") from None
        n = spec.L * spec.m
        if d.mu.shape != (n,) or d.basis.ndim != 2 or d.basis.shape[0] != n or not 1 <= d.basis.shape[1] <= n \
                or d.profile.shape != (spec.L, spec.k):
            raise SparseCodeError(f"{path}: decoy code shapes {d.mu.shape}/{d.basis.shape}/{d.profile.shape} do not "
                                  f"fit L={spec.L}, m={spec.m}, k={spec.k}")
        if not (np.all(np.isfinite(d.mu)) and np.all(np.isfinite(d.basis))
                and np.isfinite(d.resid) and d.resid >= 0 and np.all(np.isfinite(d.profile))
                and np.all(d.profile > 0) and np.all(np.diff(d.profile, axis=1) <= 0)):
            raise SparseCodeError(f"{path}: decoy codes hold values that are not finite, a negative variance or a "
                                  "profile that is not positive and decreasing")
        return d

    @classmethod
    def fit(cls, dense: np.ndarray, k: int, rank: int = 256) -> "CodeDecoys":
        """Dense training codes (N, L, m) before the top-k → their decoys."""
        dense = np.asarray(dense, np.float32)
        mu, basis, resid, _ = fit_code_gaussian(dense, rank)
        profile = (-np.sort(-np.abs(dense), axis=2)[:, :, :k]).mean(axis=0)
        return cls(mu=mu.astype(np.float32), basis=basis.astype(np.float16), resid=resid,
                   profile=profile.astype(np.float32))


def _with_profile(values: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """(L, k) values → the profile's magnitudes in their own order of magnitude, their signs."""
    order = np.argsort(-np.abs(values), axis=1, kind="stable")
    out = np.empty_like(values, dtype=np.float32)
    np.put_along_axis(out, order, np.where(np.take_along_axis(values, order, axis=1) < 0, -profile, profile), axis=1)
    return out


def decoy_sampler(decoys: CodeDecoys) -> Callable[[int, np.random.Generator], np.ndarray]:
    """`sample(n, rng)` → n dense decoy codes (n, L·m) float32 from the decoys' Gaussian."""
    basis = np.asarray(decoys.basis, np.float32)
    sd = float(np.sqrt(decoys.resid))

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        return decoys.mu + rng.standard_normal((n, basis.shape[1])).astype(np.float32) @ basis.T \
            + sd * rng.standard_normal((n, basis.shape[0])).astype(np.float32)

    return sample


def decoy_count(spec: SparseSpec) -> int:
    """Decoy codes per photo, k_fake / k; SparseCodeError when k does not divide k_fake."""
    if spec.k_fake % spec.k:
        raise SparseCodeError(f"decoy codes need k_fake a multiple of k; the card has k_fake={spec.k_fake}, k={spec.k}")
    return spec.k_fake // spec.k


def place_decoys(code: np.ndarray, decoys: np.ndarray, k: int, values: Callable[[np.ndarray], np.ndarray],
                 weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense decoy codes (n, L, m) → fake (positions, values), each (L, n·k): decoy after
    decoy, its k largest magnitudes per map (times `weight` (L, m) when given) among the
    positions the true support (of `code`) and the decoys before it left free; `values` maps
    a decoy's (L, k) values to released ones."""
    n, L, m = decoys.shape
    taken = np.zeros((L, m), bool)
    np.put_along_axis(taken, _true_support(code, k), True, axis=1)
    pos = np.empty((L, n * k), np.int64)
    val = np.empty((L, n * k), np.float32)
    for d in range(n):
        score = np.abs(decoys[d]) if weight is None else np.abs(decoys[d]) * weight
        p = np.argpartition(-np.where(taken, -1.0, score), k - 1, axis=1)[:, :k]
        np.put_along_axis(taken, p, True, axis=1)
        pos[:, d * k:(d + 1) * k] = p
        val[:, d * k:(d + 1) * k] = values(np.take_along_axis(decoys[d], p, axis=1))
    return pos, val


def code_fakes(decoys: CodeDecoys) -> FakeEntries:
    """A fake-entry sampler for `ambiguate` with `CodeDecoys` (class docstring): k_fake / k
    whole decoy codes (`place_decoys`), their values with the public profile."""
    sample = decoy_sampler(decoys)

    def draw(code: np.ndarray, spec: SparseSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = decoy_count(spec)
        return place_decoys(code, sample(n, rng).reshape(n, spec.L, spec.m), spec.k,
                            lambda v: _with_profile(v, decoys.profile))

    draw.profile = decoys.profile  # type: ignore[attr-defined]  # the public magnitudes of the true entries
    return draw


def read_decoys(path: "str | object", spec: SparseSpec) -> "DecoyBank | CodeDecoys":
    """The card's decoys file: `CodeDecoys` for a card with `sparse.magnitudes: "key"`, else
    a `DecoyBank`."""
    return CodeDecoys.load(path, spec) if getattr(spec, "magnitudes", None) == "key" else DecoyBank.load(path, spec)


def decoy_fakes(decoys: "DecoyBank | CodeDecoys | None") -> "FakeEntries | None":
    """The fake sampler of loaded decoys (None: uniform fakes)."""
    if decoys is None:
        return None
    return code_fakes(decoys) if isinstance(decoys, CodeDecoys) else bank_fakes(decoys)


def _ambiguate_public_magnitudes(code: np.ndarray, spec: SparseSpec, rng: np.random.Generator,
                                 fakes: "FakeEntries | None") -> tuple[AmbiguatedCode, bytes]:
    """`ambiguate` for `sparse.magnitudes: "key"`: the true entries are released with the
    public profile's magnitudes (carried by the fakes sampler's decoys), the true
    magnitudes go into a version-2 key."""
    draw = getattr(fakes, "profile", None)
    if fakes is None or draw is None:
        raise SparseCodeError('a card with sparse.magnitudes "key" needs its decoy codes (CodeDecoys) to ambiguate')
    if spec.value_bits is None:
        raise SparseCodeError('sparse.magnitudes "key" needs sparse.value_bits')
    k = spec.k
    t = np.sort(_true_support(code, k), axis=1)
    tv = np.take_along_axis(code, t, axis=1)
    f, fv = fakes(code, spec, rng)
    pos = np.concatenate([t, f], axis=1)
    val = np.concatenate([_with_profile(tv, draw), fv], axis=1)
    is_true = np.concatenate([np.ones((spec.L, k), bool), np.zeros((spec.L, spec.k_fake), bool)], axis=1)
    order = np.argsort(pos, axis=1, kind="stable")
    indices = np.take_along_axis(pos, order, axis=1)
    values = np.take_along_axis(val, order, axis=1)
    mask = np.take_along_axis(is_true, order, axis=1)
    values = snap_to_grid(values, _scale(values), spec.value_bits)
    amb = AmbiguatedCode(indices=indices.astype(INDEX_DTYPE), values=values.astype(VALUE_DTYPE))
    # the key's magnitudes in the order the mask lists true entries: increasing position
    return amb, pack_key_magnitudes(mask, k, amb.fingerprint(), np.abs(tv), spec.value_bits)


def pack_key(mask: np.ndarray, k: int, fingerprint: bytes) -> bytes:
    L, kp = mask.shape
    return _HEADER.pack(KEY_MAGIC, KEY_VERSION, L, kp, k, fingerprint) + np.packbits(mask, axis=None).tobytes()


def pack_key_magnitudes(mask: np.ndarray, k: int, fingerprint: bytes, magnitudes: np.ndarray,
                        value_bits: int) -> bytes:
    """Key version 2 (module docstring): the mask and the true magnitudes (L, k), per map
    in increasing position, on a (value_bits - 1)-bit grid scaled to their largest."""
    _check_value_bits(value_bits)
    L, kp = mask.shape
    mags = np.abs(np.asarray(magnitudes, np.float32))
    scale = _scale(mags)
    levels = quantise_levels(mags.ravel(), scale, value_bits)
    vb = value_bits - 1
    acc = 0
    for q in levels.tolist():
        acc = (acc << vb) | q
    n = math.ceil(L * k * vb / 8)
    acc <<= n * 8 - L * k * vb
    return (_HEADER.pack(KEY_MAGIC, KEY_VERSION_MAGNITUDES, L, kp, k, fingerprint)
            + np.packbits(mask, axis=None).tobytes() + bytes([value_bits]) + struct.pack(">e", scale)
            + acc.to_bytes(n, "big"))


def _parse_key(key: bytes) -> tuple[np.ndarray, int, bytes, np.ndarray | None, float | None]:
    """Key bytes (version 1 or 2) → (mask (L, k') bool, k, fingerprint, and for a version-2
    key the true magnitudes (L, k) float32 and their grid's scale, else None, None). Raises
    KeyMismatchError (one line)."""
    key = bytes(key)
    if len(key) < _HEADER.size:
        raise KeyMismatchError(f"key is {len(key)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, L, kp, k, fp = _HEADER.unpack_from(key)
    if magic != KEY_MAGIC:
        raise KeyMismatchError("key does not start with the PRIC key marker")
    if version not in (KEY_VERSION, KEY_VERSION_MAGNITUDES):
        raise KeyMismatchError(f"key version {version} is not supported (expected {KEY_VERSION} "
                               f"or {KEY_VERSION_MAGNITUDES})")
    n_mask = math.ceil(L * kp / 8)
    body = key[_HEADER.size:]
    rest = body[n_mask:]
    if version == KEY_VERSION and len(body) != n_mask:
        raise KeyMismatchError(f"key body is {len(body)} bytes, expected {n_mask} for L={L}, k'={kp}")
    if version == KEY_VERSION_MAGNITUDES:
        vb = rest[0] if rest else 0
        if not VALUE_BITS_RANGE[0] <= vb <= VALUE_BITS_RANGE[1]:
            raise KeyMismatchError(f"key states value_bits {vb}, expected {VALUE_BITS_RANGE[0]}..{VALUE_BITS_RANGE[1]}")
        n_mag = math.ceil(L * k * (vb - 1) / 8)
        if len(body) != n_mask + 3 + n_mag:
            raise KeyMismatchError(f"key body is {len(body)} bytes, expected {n_mask + 3 + n_mag} for L={L}, "
                                   f"k'={kp}, k={k}, value_bits={vb}")
    mask = np.unpackbits(np.frombuffer(body[:n_mask], dtype=np.uint8), count=L * kp).astype(bool).reshape(L, kp)
    if np.any(mask.sum(axis=1) != k):
        raise KeyMismatchError(f"key does not mark exactly k={k} true positions in every code map")
    if version == KEY_VERSION:
        return mask, k, fp, None, None
    scale = float(np.frombuffer(rest[1:3], dtype=">f2")[0])
    if not (np.isfinite(scale) and scale >= 0):
        raise KeyMismatchError(f"key has magnitude scale {scale}, expected a finite value >= 0")
    w = vb - 1
    acc = int.from_bytes(rest[3:], "big")
    pad = n_mag * 8 - L * k * w
    if acc & ((1 << pad) - 1):
        raise KeyMismatchError("key has non-zero padding bits")
    acc >>= pad
    levels = np.empty(L * k, np.int64)
    for i in range(L * k - 1, -1, -1):
        levels[i] = acc & ((1 << w) - 1)
        acc >>= w
    return mask, k, fp, level_values(levels, scale, vb).reshape(L, k), scale


def unpack_key(key: bytes) -> tuple[np.ndarray, int, bytes]:
    """Key bytes → (mask (L, k') bool, k, fingerprint). Raises KeyMismatchError."""
    return _parse_key(key)[:3]


def disambiguate(code: AmbiguatedCode, key: bytes, m: int) -> np.ndarray:
    """Apply the owner's key: ambiguated code → true dense code float32 (L, m). A version-2
    key carries the true magnitudes; the signs are the public code's."""
    mask, _, fp, mags, _ = _parse_key(key)
    if mask.shape != code.indices.shape:
        raise KeyMismatchError(f"key is for codes of shape {mask.shape}, this code has {code.indices.shape}")
    if fp != code.fingerprint():
        raise KeyMismatchError("key belongs to a different code (fingerprint mismatch)")
    dense = np.zeros((mask.shape[0], m), dtype=np.float32)
    for l in range(mask.shape[0]):
        v = code.values[l, mask[l]].astype(np.float32)
        if mags is not None:
            v = np.where(v < 0, -mags[l], mags[l]).astype(np.float32)
        dense[l, code.indices[l, mask[l]].astype(np.int64)] = v
    return dense


def true_scale(code: AmbiguatedCode, key: bytes) -> float:
    """The grid scale of the true values a key holder gets from `disambiguate`: the key's
    (version 2) or the released code's (`released_scale`)."""
    scale = _parse_key(key)[4]
    return released_scale(code) if scale is None else scale


def key_size_bytes(spec: SparseSpec) -> int:
    size = _HEADER.size + math.ceil(spec.L * spec.k_prime / 8)
    if getattr(spec, "magnitudes", None) == "key" and spec.value_bits:
        size += 3 + math.ceil(spec.L * spec.k * (spec.value_bits - 1) / 8)
    return size


def key_entropy_bits(spec: SparseSpec) -> float:
    """Information-theoretic key size L·log2(C(k', k)) bits."""
    return spec.L * (math.lgamma(spec.k_prime + 1) - math.lgamma(spec.k + 1) - math.lgamma(spec.k_fake + 1)) / math.log(2)


def validate_code(indices: np.ndarray, values: np.ndarray, spec: SparseSpec) -> AmbiguatedCode:
    """Collector-side checks of an uploaded ambiguated code. Raises SparseCodeError (400)."""
    shape = (spec.L, spec.k_prime)
    if indices.shape != shape or values.shape != shape:
        raise SparseCodeError(f"indices/values have shapes {indices.shape}/{values.shape}, expected {shape}")
    if indices.dtype != INDEX_DTYPE or values.dtype != VALUE_DTYPE:
        raise SparseCodeError(f"indices/values must be uint16/float16, got {indices.dtype}/{values.dtype}")
    if indices.size and int(indices.max()) >= spec.m:
        raise SparseCodeError(f"index {int(indices.max())} out of range for code maps of length {spec.m}")
    if spec.k_prime > 1 and np.any(np.diff(indices.astype(np.int64), axis=1) <= 0):
        raise SparseCodeError("indices must be strictly increasing within each code map")
    if not np.all(np.isfinite(values.astype(np.float32))):
        raise SparseCodeError("values contain NaN or infinite entries")
    return AmbiguatedCode(indices=indices, values=values)


# --- compact true code ----------------------------------------------------------------------


def _check_value_bits(value_bits: int | None) -> None:
    lo, hi = VALUE_BITS_RANGE
    if value_bits is not None and not lo <= int(value_bits) <= hi:
        raise SparseCodeError(f"value_bits {value_bits} must be in [{lo}, {hi}] (or None for float16 values)")


def _scale(values: np.ndarray) -> np.float16:
    """The per-photo scale of the value grid: the largest magnitude, as float16."""
    scale = np.float16(float(np.max(np.abs(values))) if values.size else 0.0)
    if not np.isfinite(scale):
        raise SparseCodeError("code has a magnitude beyond the float16 range; it cannot be quantised")
    return scale


def quantise_levels(magnitudes: np.ndarray, scale: float, value_bits: int) -> np.ndarray:
    """Magnitudes (any shape, >= 0) → levels q in [0, 2^(value_bits-1)), int64: the nearest
    level in the companded domain (magnitude / scale)^(1/1.5), clipped to the grid."""
    n = 1 << (value_bits - 1)
    if float(scale) <= 0:
        return np.zeros(np.shape(magnitudes), dtype=np.int64)
    u = np.clip(np.asarray(magnitudes, dtype=np.float64) / float(scale), 0.0, None)
    return np.clip(np.rint(u ** (1.0 / COMPAND_POWER) * n) - 1, 0, n - 1).astype(np.int64)


def level_values(levels: np.ndarray, scale: float, value_bits: int) -> np.ndarray:
    """Levels q → magnitudes scale · ((q + 1) / 2^(value_bits-1))^1.5, float32 (same shape)."""
    n = 1 << (value_bits - 1)
    return (float(scale) * ((np.asarray(levels, dtype=np.float64) + 1) / n) ** COMPAND_POWER).astype(np.float32)


def snap_to_grid(values: np.ndarray, scale: float, value_bits: int) -> np.ndarray:
    """Signed values → the nearest grid value of the same sign, float32 (same shape)."""
    v = np.asarray(values, dtype=np.float32)
    return np.where(v < 0, -1.0, 1.0).astype(np.float32) * level_values(
        quantise_levels(np.abs(v), scale, value_bits), scale, value_bits)


def released_scale(code: AmbiguatedCode) -> float:
    """The grid scale of an ambiguated code quantised by `ambiguate`: its largest magnitude."""
    return float(_scale(code.values.astype(np.float32)))


def quantise_code(code: np.ndarray, k: int, value_bits: int, scale: float | None = None) -> np.ndarray:
    """Dense code (L, m) → its top-k per map with the values on the grid of `scale` (float16;
    default: the largest kept magnitude; larger magnitudes go to the top level), float32
    (L, m): what `unpack_compact` returns for `pack_compact` with the same arguments."""
    _check_value_bits(value_bits)
    kept = top_k(np.asarray(code, dtype=np.float32), k)
    nz = kept != 0
    scale = _scale(kept[nz]) if scale is None else _scale(np.array([scale]))
    out = np.zeros_like(kept)
    out[nz] = snap_to_grid(kept[nz], scale, value_bits)
    return out


@functools.lru_cache(maxsize=8)
def _binomials(m: int, k: int) -> tuple[tuple[int, ...], ...]:
    """table[i][c] = C(c, i) for 0 <= i <= k, 0 <= c < m (python ints)."""
    return tuple(tuple(math.comb(c, i) for c in range(m)) for i in range(k + 1))


def support_rank(positions: np.ndarray, m: int, k: int) -> int:
    """k distinct positions in [0, m) → their rank in the combinatorial number system,
    Σ_i C(c_i, i) over the sorted positions c_1 < ... < c_k: an integer in [0, C(m, k))."""
    table = _binomials(m, k)
    return sum(table[i][int(c)] for i, c in enumerate(sorted(int(p) for p in positions), start=1))


def support_unrank(rank: int, m: int, k: int) -> np.ndarray:
    """Inverse of `support_rank`: rank in [0, C(m, k)) → sorted positions int64 (k,)."""
    table = _binomials(m, k)
    out = np.empty(k, dtype=np.int64)
    c = m - 1
    for i in range(k, 0, -1):
        while table[i][c] > rank:
            c -= 1
        out[i - 1] = c
        rank -= table[i][c]
        c -= 1
    return out


def _layout(L: int, m: int, k: int, value_bits: int | None) -> tuple[int, int, int, int]:
    """(header bytes, support bits, bits per value, total bytes) of a compact code."""
    header = 1 + (2 if value_bits is not None else 0)
    support_bits = (math.comb(m, k) ** L - 1).bit_length()
    per_value = value_bits if value_bits is not None else 16
    return header, support_bits, per_value, header + math.ceil((support_bits + L * k * per_value) / 8)


def compact_size(spec: SparseSpec) -> int:
    """Bytes of one compact true code for `spec` (the format has a fixed length)."""
    _check_value_bits(spec.value_bits)
    return _layout(spec.L, spec.m, spec.k, spec.value_bits)[3]


def pack_compact(code: np.ndarray, k: int, value_bits: int | None = None, scale: float | None = None) -> bytes:
    """The true code (L, m), top-k per map (values quantised on the grid of `scale` when
    `value_bits` is set, else float16) → compact bytes; see the module docstring. `scale`
    (float16) defaults to the largest kept magnitude; for a code ambiguated with value_bits
    pass `released_scale(ambiguated code)`, the grid its values already lie on."""
    _check_value_bits(value_bits)
    code = np.asarray(code, dtype=np.float32)
    if code.ndim != 2 or not 1 <= k <= code.shape[1]:
        raise SparseCodeError(f"code of shape {code.shape} cannot keep k={k} values per map")
    L, m = code.shape
    pos = np.sort(_true_support(code, k), axis=1)
    vals = np.take_along_axis(code, pos, axis=1)
    header_len, support_bits, per_value, total = _layout(L, m, k, value_bits)
    if value_bits is None:
        v16 = vals.astype(VALUE_DTYPE)
        if not np.all(np.isfinite(v16)):
            raise SparseCodeError("code has a value beyond the float16 range")
        words, header = v16.view(np.uint16).astype(np.int64), bytes([COMPACT_VERSION])
    else:
        scale = _scale(vals) if scale is None else _scale(np.array([scale]))
        levels = quantise_levels(np.abs(vals), scale, value_bits)
        words = ((vals < 0).astype(np.int64) << (value_bits - 1)) | levels
        header = bytes([COMPACT_VERSION]) + struct.pack(">e", scale)
    c = math.comb(m, k)
    acc = 0
    for l in range(L - 1, -1, -1):  # map 0 is the least significant digit
        acc = acc * c + support_rank(pos[l], m, k)
    for w in words.ravel().tolist():
        acc = (acc << per_value) | w
    n_body = total - header_len
    acc <<= n_body * 8 - support_bits - L * k * per_value
    return header + acc.to_bytes(n_body, "big")


def unpack_compact(data: bytes, spec: SparseSpec) -> np.ndarray:
    """Compact bytes of a true code → dense code float32 (spec.L, spec.m) with k non-zeros
    per map. Raises SparseCodeError (one line) on a wrong length, version, scale, padding
    or support number."""
    _check_value_bits(spec.value_bits)
    L, m, k, vb = spec.L, spec.m, spec.k, spec.value_bits
    header_len, support_bits, per_value, total = _layout(L, m, k, vb)
    data = bytes(data)
    if len(data) != total:
        raise SparseCodeError(f"compact code is {len(data)} bytes, expected {total} for L={L}, m={m}, k={k}, "
                              f"value_bits={vb}")
    if data[0] != COMPACT_VERSION:
        raise SparseCodeError(f"compact code version {data[0]} is not supported (expected {COMPACT_VERSION})")
    scale = 0.0
    if vb is not None:
        scale = float(np.frombuffer(data[1:3], dtype=">f2")[0])
        if not (np.isfinite(scale) and scale >= 0):
            raise SparseCodeError(f"compact code has scale {scale}, expected a finite value >= 0")
    acc = int.from_bytes(data[header_len:], "big")
    pad = (total - header_len) * 8 - support_bits - L * k * per_value
    if acc & ((1 << pad) - 1):
        raise SparseCodeError("compact code has non-zero padding bits")
    acc >>= pad
    mask = (1 << per_value) - 1
    words = np.empty(L * k, dtype=np.int64)
    for i in range(L * k - 1, -1, -1):
        words[i] = acc & mask
        acc >>= per_value
    c = math.comb(m, k)
    if acc >= c ** L:
        raise SparseCodeError("compact code's support number is out of range (corrupted code)")
    dense = np.zeros((L, m), dtype=np.float32)
    words = words.reshape(L, k)
    for l in range(L):
        acc, rank = divmod(acc, c)
        pos = support_unrank(rank, m, k)
        if vb is None:
            vals = words[l].astype(np.uint16).view(VALUE_DTYPE).astype(np.float32)
            if not np.all(np.isfinite(vals)):
                raise SparseCodeError("compact code has a NaN or infinite value")
        else:
            sign = np.where(words[l] >> (vb - 1), -1.0, 1.0).astype(np.float32)
            vals = sign * level_values(words[l] & ((1 << (vb - 1)) - 1), scale, vb)
        dense[l, pos] = vals
    return dense


# --- compact ambiguated code (the wire form) ------------------------------------------------
AMBIGUATED_VERSION = 2  # first byte; differs from COMPACT_VERSION so the two are never confused


def _ambiguated_layout(spec: SparseSpec) -> tuple[int, int, int]:
    """(support bits, bits per value, total bytes) of a compact ambiguated code."""
    if spec.value_bits is None:
        raise SparseCodeError("the compact ambiguated format needs a card with sparse.value_bits")
    _check_value_bits(spec.value_bits)
    support_bits = (math.comb(spec.m, spec.k_prime) ** spec.L - 1).bit_length()
    return support_bits, spec.value_bits, 3 + math.ceil((support_bits + spec.L * spec.k_prime * spec.value_bits) / 8)


def ambiguated_size(spec: SparseSpec) -> int:
    """Bytes of one compact ambiguated code for `spec` (fixed length)."""
    return _ambiguated_layout(spec)[2]


def pack_ambiguated(code: AmbiguatedCode, spec: SparseSpec) -> bytes:
    """An ambiguated code whose values lie on the value_bits grid of its released scale
    (what `ambiguate` makes for a card with value_bits) → compact bytes:

        version u8 (2) | scale float16 big-endian (the largest released magnitude)
        | bit-packed, MSB first, zero-padded: the L supports of k' positions as ONE
          integer Σ_l rank_l · C(m, k')^l; then per map, per entry in increasing position,
          a sign bit and a (value_bits - 1)-bit level (as in `pack_compact`)

    The same photo as uint16 index + float16 value per entry would take 4·L·k' bytes."""
    support_bits, vb, total = _ambiguated_layout(spec)
    idx = np.asarray(code.indices).astype(np.int64)
    if idx.shape != (spec.L, spec.k_prime):
        raise SparseCodeError(f"ambiguated code has shape {idx.shape}, expected {(spec.L, spec.k_prime)}")
    vals = np.asarray(code.values).astype(np.float32)
    scale = _scale(vals)
    levels = quantise_levels(np.abs(vals), scale, vb)
    words = ((vals < 0).astype(np.int64) << (vb - 1)) | levels
    c = math.comb(spec.m, spec.k_prime)
    acc = 0
    for l in range(spec.L - 1, -1, -1):
        acc = acc * c + support_rank(idx[l], spec.m, spec.k_prime)
    for w in words.ravel().tolist():
        acc = (acc << vb) | w
    n_body = total - 3
    acc <<= n_body * 8 - support_bits - spec.L * spec.k_prime * vb
    return bytes([AMBIGUATED_VERSION]) + struct.pack(">e", scale) + acc.to_bytes(n_body, "big")


def unpack_ambiguated(data: bytes, spec: SparseSpec) -> AmbiguatedCode:
    """Compact bytes → AmbiguatedCode (uint16 sorted indices, float16 grid values). Hostile
    input gets a one-line SparseCodeError (HTTP 400): wrong length or version, a scale
    that is not finite and >= 0, non-zero padding, or a support number >= C(m, k')^L
    (which would decode to positions outside the code maps)."""
    support_bits, vb, total = _ambiguated_layout(spec)
    data = bytes(data)
    if len(data) != total:
        raise SparseCodeError(f"ambiguated code is {len(data)} bytes, expected {total} for L={spec.L}, m={spec.m}, "
                              f"k'={spec.k_prime}, value_bits={vb}")
    if data[0] != AMBIGUATED_VERSION:
        raise SparseCodeError(f"ambiguated code version {data[0]} is not supported (expected {AMBIGUATED_VERSION})")
    scale = float(np.frombuffer(data[1:3], dtype=">f2")[0])
    if not (np.isfinite(scale) and scale >= 0):
        raise SparseCodeError(f"ambiguated code has scale {scale}, expected a finite value >= 0")
    acc = int.from_bytes(data[3:], "big")
    pad = (total - 3) * 8 - support_bits - spec.L * spec.k_prime * vb
    if acc & ((1 << pad) - 1):
        raise SparseCodeError("ambiguated code has non-zero padding bits")
    acc >>= pad
    n = spec.L * spec.k_prime
    mask = (1 << vb) - 1
    words = np.empty(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        words[i] = acc & mask
        acc >>= vb
    c = math.comb(spec.m, spec.k_prime)
    if acc >= c ** spec.L:
        raise SparseCodeError("ambiguated code's support number is out of range: its positions would fall "
                              f"outside code maps of length {spec.m}")
    indices = np.empty((spec.L, spec.k_prime), dtype=INDEX_DTYPE)
    for l in range(spec.L):
        acc, rank = divmod(acc, c)
        indices[l] = support_unrank(rank, spec.m, spec.k_prime)
    words = words.reshape(spec.L, spec.k_prime)
    sign = np.where(words >> (vb - 1), -1.0, 1.0).astype(np.float32)
    values = (sign * level_values(words & ((1 << (vb - 1)) - 1), scale, vb)).astype(VALUE_DTYPE)
    return AmbiguatedCode(indices=indices, values=values)


def code_to_arrays(code: AmbiguatedCode, spec: SparseSpec) -> dict[str, np.ndarray]:
    """The arrays one uploaded item carries (protocol.model_card.wire_arrays): the compact
    form as one uint8 array `code` for a card with sparse.wire "compact", else `indices`
    and `values`."""
    if spec.wire == "compact":
        return {"code": np.frombuffer(pack_ambiguated(code, spec), dtype=np.uint8).copy()}
    return {"indices": code.indices, "values": code.values}


def code_from_arrays(arrays: dict[str, np.ndarray], spec: SparseSpec) -> AmbiguatedCode:
    """Collector side: an uploaded item's arrays → its checked AmbiguatedCode. Raises
    SparseCodeError (HTTP 400, one line) on anything malformed, out-of-range positions included."""
    if spec.wire == "compact":
        data = arrays.get("code")
        if data is None or data.dtype != np.uint8 or data.ndim != 1:
            raise SparseCodeError("a compact sparse code must be one uint8 array 'code'")
        return validate_code(*_fields(unpack_ambiguated(data.tobytes(), spec)), spec)
    if "indices" not in arrays or "values" not in arrays:
        raise SparseCodeError("a sparse code needs the arrays 'indices' and 'values'")
    return validate_code(arrays["indices"], arrays["values"], spec)


def _fields(code: AmbiguatedCode) -> tuple[np.ndarray, np.ndarray]:
    return code.indices, code.values
