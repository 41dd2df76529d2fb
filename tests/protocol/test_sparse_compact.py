"""The compact true code (pack_compact / unpack_compact) and quantised ambiguation
(SparseSpec.value_bits): round trips, exact sizes, one-line refusals of corrupted input,
and released true and fake values that share one grid."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from protocol.errors import ModelIntegrityError
from protocol.model_card import ModelCard, SparseSpec
from protocol.sparse_code import (
    COMPACT_VERSION,
    SparseCodeError,
    ambiguate,
    compact_size,
    disambiguate,
    pack_compact,
    quantise_code,
    released_scale,
    snap_to_grid,
    support_rank,
    support_unrank,
    top_k,
    unpack_compact,
    unpack_key,
)

SPEC = SparseSpec(L=8, m=256, k=24, k_fake=40, value_bits=6)


def _code(seed: int = 0, spec: SparseSpec = SPEC) -> np.ndarray:
    """A top-k code (L, m) with map-dependent scales, like an encoder's."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((spec.L, spec.m)) * rng.gamma(2.0, 1.0, (spec.L, 1))
    return top_k(dense.astype(np.float32), spec.k)


@pytest.mark.parametrize("value_bits", [2, 5, 6, 8, 10])
def test_quantised_round_trip_keeps_the_support_and_the_grid(value_bits: int) -> None:
    code = _code(1)
    spec = dataclasses.replace(SPEC, value_bits=value_bits)

    data = pack_compact(code, spec.k, value_bits)
    back = unpack_compact(data, spec)

    assert np.array_equal(back != 0, code != 0)
    assert np.array_equal(back, quantise_code(code, spec.k, value_bits))
    assert np.array_equal(np.sign(back), np.sign(code))
    if value_bits >= 5:
        # companded levels: the error is a small share of the largest magnitude
        assert np.abs(back - code).max() < 0.2 * np.abs(code).max()


def test_quantisation_error_shrinks_with_more_value_bits() -> None:
    code = _code(2)

    errors = [float(np.mean((quantise_code(code, SPEC.k, b) - code) ** 2)) for b in (4, 6, 8)]

    assert errors[0] > errors[1] > errors[2] > 0


def test_float16_round_trip_without_value_bits() -> None:
    spec = dataclasses.replace(SPEC, value_bits=None)
    code = _code(3)

    back = unpack_compact(pack_compact(code, spec.k, None), spec)

    assert np.array_equal(back, code.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(("L", "m", "k", "value_bits"), [(8, 256, 24, 6), (8, 256, 15, 5), (4, 32, 4, None), (1, 2, 1, 2)])
def test_size_is_the_header_plus_the_bit_count(L: int, m: int, k: int, value_bits: int | None) -> None:
    spec = SparseSpec(L=L, m=m, k=k, k_fake=0, value_bits=value_bits)
    code = top_k(np.random.default_rng(4).standard_normal((L, m)).astype(np.float32), k)
    support_bits = math.ceil(L * math.log2(math.comb(m, k)) - 1e-9)
    header = 1 + (2 if value_bits else 0)

    data = pack_compact(code, k, value_bits)

    assert len(data) == compact_size(spec) == header + math.ceil((support_bits + L * k * (value_bits or 16)) / 8)
    assert data[0] == COMPACT_VERSION


def test_support_rank_is_a_bijection_onto_the_binomial_range() -> None:
    m, k = 40, 6
    rng = np.random.default_rng(5)
    subsets = [np.sort(rng.choice(m, size=k, replace=False)) for _ in range(200)]

    ranks = [support_rank(s, m, k) for s in subsets]

    assert all(0 <= r < math.comb(m, k) for r in ranks)
    assert all(np.array_equal(support_unrank(r, m, k), s) for r, s in zip(ranks, subsets))
    assert support_rank(np.arange(k), m, k) == 0
    assert support_rank(np.arange(m - k, m), m, k) == math.comb(m, k) - 1
    assert len(set(ranks)) == len({tuple(s) for s in subsets})


def _corrupt_support(data: bytes, spec: SparseSpec) -> bytes:
    """Set every support bit to one: a support number >= C(m, k)^L (checked below)."""
    support_bits = (math.comb(spec.m, spec.k) ** spec.L - 1).bit_length()
    body = int.from_bytes(data[3:], "big")
    shift = len(data[3:]) * 8 - support_bits
    body |= ((1 << support_bits) - 1) << shift
    return data[:3] + body.to_bytes(len(data) - 3, "big")


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d[:-1], "bytes, expected"),
    (lambda d: d + b"\x00", "bytes, expected"),
    (lambda d: b"", "0 bytes"),
    (lambda d: bytes([COMPACT_VERSION + 1]) + d[1:], "version"),
    (lambda d: d[:1] + np.array([np.nan], ">f2").tobytes() + d[3:], "scale"),
    (lambda d: d[:1] + np.array([-1.0], ">f2").tobytes() + d[3:], "scale"),
    (lambda d: _corrupt_support(d, SPEC), "out of range"),
])
def test_corrupted_compact_codes_are_refused_in_one_line(mutate, match: str) -> None:
    data = pack_compact(_code(6), SPEC.k, SPEC.value_bits)
    assert (math.comb(SPEC.m, SPEC.k) ** SPEC.L) != 1 << (math.comb(SPEC.m, SPEC.k) ** SPEC.L - 1).bit_length()

    with pytest.raises(SparseCodeError, match=match) as err:
        unpack_compact(mutate(data), SPEC)

    assert "\n" not in str(err.value)


def test_non_zero_padding_is_refused() -> None:
    spec = SparseSpec(L=1, m=8, k=2, k_fake=0, value_bits=2)  # 5 + 4 bits: 7 bits of padding
    data = pack_compact(top_k(np.arange(8, dtype=np.float32).reshape(1, 8) - 3.5, 2), 2, 2)

    with pytest.raises(SparseCodeError, match="padding"):
        unpack_compact(data[:-1] + bytes([data[-1] | 1]), spec)


def test_bad_value_bits_and_shapes_are_refused() -> None:
    with pytest.raises(SparseCodeError, match="value_bits"):
        pack_compact(_code(), SPEC.k, 11)
    with pytest.raises(SparseCodeError, match="k=300"):
        pack_compact(_code(), 300, 6)


def test_a_key_holder_packs_the_released_true_values_without_loss() -> None:
    code = _code(7)

    amb, key = ambiguate(code, SPEC, np.random.default_rng(0))
    recovered = disambiguate(amb, key, SPEC.m)  # float16 values, as on the wire
    scale = released_scale(amb)
    data = pack_compact(recovered, SPEC.k, SPEC.value_bits, scale)
    held = unpack_compact(data, SPEC)

    assert len(data) == compact_size(SPEC)
    assert np.array_equal(held.astype(np.float16).astype(np.float32), recovered)  # the wire values, exactly
    assert pack_compact(held, SPEC.k, SPEC.value_bits, scale) == data
    assert np.array_equal(held, quantise_code(code, SPEC.k, SPEC.value_bits, scale))
    assert scale >= float(np.float16(np.abs(code).max()))  # the grid covers every true value: none clipped


def test_true_and_fake_values_share_one_grid() -> None:
    code = _code(8)
    n_levels = 1 << (SPEC.value_bits - 1)

    amb, key = ambiguate(code, SPEC, np.random.default_rng(1))
    mask, _, _ = unpack_key(key)
    values = amb.values.astype(np.float32)
    scale = released_scale(amb)

    on_grid = snap_to_grid(values, scale, SPEC.value_bits).astype(np.float16).astype(np.float32)
    assert np.array_equal(values, on_grid)  # true and fake: every released value is a grid value
    assert len(np.unique(np.abs(values[mask]))) <= n_levels and len(np.unique(np.abs(values[~mask]))) <= n_levels
    assert len(np.unique(np.abs(values))) <= n_levels


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of 1-D samples (ties allowed)."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def test_quantised_fakes_are_indistinguishable_from_true_values() -> None:
    """Pooled over photos, the released levels of true and fake non-zeros have the same law
    (KS distance near the sampling noise), and ranking magnitudes recovers the support only
    at chance k/k', ties broken by position as an attacker without the key must."""
    spec = SparseSpec(L=4, m=256, k=20, k_fake=180, value_bits=5)
    rng = np.random.default_rng(2)
    true_rel, fake_rel, top_hits, bottom_hits, maps = [], [], 0, 0, 0
    for seed in range(60):
        code = _code(100 + seed, spec)
        amb, key = ambiguate(code, spec, rng)
        mask, _, _ = unpack_key(key)
        mags = np.abs(amb.values.astype(np.float32))
        rel = mags / mags.max(axis=1, keepdims=True)  # per map: no attacker needs the scale
        true_rel.append(rel[mask]); fake_rel.append(rel[~mask])
        order = np.argsort(mags, axis=1, kind="stable")
        ranked = np.take_along_axis(mask, order, axis=1)
        top_hits += ranked[:, -spec.k:].sum(); bottom_hits += ranked[:, :spec.k].sum()
        maps += spec.L
    chance = spec.k / spec.k_prime

    d = _ks(np.concatenate(true_rel), np.concatenate(fake_rel))
    n_true, n_fake = sum(map(len, true_rel)), sum(map(len, fake_rel))
    # 1.63·sqrt((n+m)/(n·m)): the KS test's 1 % critical value, here about 0.06
    assert d < 1.63 * math.sqrt((n_true + n_fake) / (n_true * n_fake))
    assert abs(top_hits / (maps * spec.k) - chance) < 0.03
    assert abs(bottom_hits / (maps * spec.k) - chance) < 0.03


def test_cards_without_value_bits_read_and_write_as_before() -> None:
    old = {"name": "s", "version": "1", "sha256": "0" * 64, "kind": "sparse_code",
           "sparse": {"L": 8, "m": 256, "k": 15, "k_fake": 135}}

    card = ModelCard.from_dict(old)
    quantised = dataclasses.replace(card, sparse=dataclasses.replace(card.sparse, value_bits=6))

    assert card.sparse.value_bits is None
    assert "value_bits" not in json.loads(card.to_json())["sparse"]
    assert ModelCard.from_json(quantised.to_json()).sparse.value_bits == 6
    with pytest.raises(ModelIntegrityError, match="value_bits"):
        ModelCard.from_dict({**old, "sparse": {**old["sparse"], "value_bits": 1}})
