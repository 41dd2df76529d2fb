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
    fake_values: FakeSampler | None = None,
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
    device: `sample_fake_values`; research runners compare other samplers through it)."""
    rng = rng or os_rng()
    fake_values = fake_values or sample_fake_values
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
