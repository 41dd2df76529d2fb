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
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass

import numpy as np

from protocol.errors import KeyMismatchError, WireFormatError
from protocol.model_card import SparseSpec

KEY_MAGIC = b"PK"
KEY_VERSION = 1
_HEADER = struct.Struct(">2sBHHH8s")
INDEX_DTYPE = np.uint16
VALUE_DTYPE = np.float16


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


def ambiguate(
    code: np.ndarray, spec: SparseSpec, rng: np.random.Generator | None = None
) -> tuple[AmbiguatedCode, bytes]:
    """Dense code (L, m) → (public ambiguated code, secret key bytes)."""
    rng = rng or os_rng()
    code = np.asarray(code, dtype=np.float32)
    if code.shape != (spec.L, spec.m):
        raise SparseCodeError(f"code has shape {code.shape}, expected {(spec.L, spec.m)}")
    kp = spec.k_prime
    indices = np.empty((spec.L, kp), dtype=np.int64)
    values = np.empty((spec.L, kp), dtype=np.float32)
    mask = np.empty((spec.L, kp), dtype=bool)
    true_pos = _true_support(code, spec.k)
    for l in range(spec.L):
        t = true_pos[l]
        free = np.setdiff1d(np.arange(spec.m), t, assume_unique=True)
        f = rng.choice(free, size=spec.k_fake, replace=False)
        tv = code[l, t]
        fv = sample_fake_values(tv, spec.k_fake, rng)
        pos = np.concatenate([t, f])
        val = np.concatenate([tv, fv])
        is_true = np.concatenate([np.ones(spec.k, bool), np.zeros(spec.k_fake, bool)])
        order = np.argsort(pos, kind="stable")
        indices[l], values[l], mask[l] = pos[order], val[order], is_true[order]
    amb = AmbiguatedCode(indices=indices.astype(INDEX_DTYPE), values=values.astype(VALUE_DTYPE))
    return amb, pack_key(mask, spec.k, amb.fingerprint())


def pack_key(mask: np.ndarray, k: int, fingerprint: bytes) -> bytes:
    L, kp = mask.shape
    return _HEADER.pack(KEY_MAGIC, KEY_VERSION, L, kp, k, fingerprint) + np.packbits(mask, axis=None).tobytes()


def unpack_key(key: bytes) -> tuple[np.ndarray, int, bytes]:
    """Key bytes → (mask (L, k') bool, k, fingerprint). Raises KeyMismatchError."""
    if len(key) < _HEADER.size:
        raise KeyMismatchError(f"key is {len(key)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, L, kp, k, fp = _HEADER.unpack_from(key)
    if magic != KEY_MAGIC:
        raise KeyMismatchError("key does not start with the PRIC key marker")
    if version != KEY_VERSION:
        raise KeyMismatchError(f"key version {version} is not supported (expected {KEY_VERSION})")
    body = key[_HEADER.size:]
    if len(body) != math.ceil(L * kp / 8):
        raise KeyMismatchError(f"key body is {len(body)} bytes, expected {math.ceil(L * kp / 8)} for L={L}, k'={kp}")
    mask = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=L * kp).astype(bool).reshape(L, kp)
    if np.any(mask.sum(axis=1) != k):
        raise KeyMismatchError(f"key does not mark exactly k={k} true positions in every code map")
    return mask, k, fp


def disambiguate(code: AmbiguatedCode, key: bytes, m: int) -> np.ndarray:
    """Apply the owner's key: ambiguated code → true dense code float32 (L, m)."""
    mask, _, fp = unpack_key(key)
    if mask.shape != code.indices.shape:
        raise KeyMismatchError(f"key is for codes of shape {mask.shape}, this code has {code.indices.shape}")
    if fp != code.fingerprint():
        raise KeyMismatchError("key belongs to a different code (fingerprint mismatch)")
    dense = np.zeros((mask.shape[0], m), dtype=np.float32)
    for l in range(mask.shape[0]):
        dense[l, code.indices[l, mask[l]].astype(np.int64)] = code.values[l, mask[l]].astype(np.float32)
    return dense


def key_size_bytes(spec: SparseSpec) -> int:
    return _HEADER.size + math.ceil(spec.L * spec.k_prime / 8)


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
