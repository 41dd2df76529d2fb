"""Decoy codes (`CodeDecoys`, card `sparse.magnitudes: "key"`): fakes are whole codes drawn
from a Gaussian of the encoder's dense codes, every released entry shows a public
magnitude, and the true magnitudes travel in a version-2 key."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from protocol.errors import KeyMismatchError
from protocol.model_card import SparseSpec
from protocol.sparse_code import (
    CodeDecoys,
    SparseCodeError,
    ambiguate,
    code_fakes,
    decoy_fakes,
    disambiguate,
    key_size_bytes,
    pack_ambiguated,
    pack_compact,
    quantise_code,
    read_decoys,
    true_scale,
    unpack_ambiguated,
    unpack_compact,
    unpack_key,
)

SPEC = SparseSpec(L=3, m=64, k=6, k_fake=12, value_bits=6, decoys="decoys.npz", wire="compact", magnitudes="key")


def _dense(n: int, seed: int = 0) -> np.ndarray:
    """Codes of a low-rank Gaussian with heavier tails on some positions (like an encoder's)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, SPEC.L * SPEC.m)) * np.tile(np.linspace(3, 0.2, SPEC.m), SPEC.L)
    return (rng.standard_t(4, size=(n, 8)) @ basis).reshape(n, SPEC.L, SPEC.m).astype(np.float32)


@pytest.fixture(scope="module")
def decoys() -> CodeDecoys:
    return CodeDecoys.fit(_dense(400), SPEC.k, rank=16)


def test_the_key_holder_gets_the_true_code_on_its_grid_and_the_wire_hides_the_magnitudes(decoys: CodeDecoys) -> None:
    rng = np.random.default_rng(1)
    for code in _dense(20, seed=5):
        amb, key = ambiguate(code, SPEC, rng, fakes=code_fakes(decoys))
        mask = unpack_key(key)[0]
        # the key holder: the true code exactly as quantise_code puts it on its own grid
        want = quantise_code(code, SPEC.k, SPEC.value_bits)
        got = disambiguate(amb, key, SPEC.m)
        assert np.array_equal(got, want)
        assert np.array_equal(unpack_compact(pack_compact(got, SPEC.k, SPEC.value_bits, true_scale(amb, key)), SPEC), want)
        # the public code: each map's true magnitudes and each decoy's are the same public profile
        mags = np.abs(amb.values.astype(np.float32))
        for l in range(SPEC.L):
            true_m = np.sort(mags[l, mask[l]])
            assert len(true_m) == SPEC.k
            assert np.array_equal(np.sort(mags[l]), np.sort(np.tile(true_m, SPEC.k_prime // SPEC.k)))
        assert len(key) == key_size_bytes(SPEC)
        # the compact wire form carries it unchanged
        back = unpack_ambiguated(pack_ambiguated(amb, SPEC), SPEC)
        assert np.array_equal(disambiguate(back, key, SPEC.m), want)


def test_decoys_are_whole_codes_that_avoid_the_true_support(decoys: CodeDecoys) -> None:
    code = _dense(1, seed=9)[0]
    pos, val = code_fakes(decoys)(code, SPEC, np.random.default_rng(2))
    assert pos.shape == val.shape == (SPEC.L, SPEC.k_fake)
    true = np.argsort(-np.abs(code), axis=1)[:, :SPEC.k]
    for l in range(SPEC.L):
        assert len(set(pos[l])) == SPEC.k_fake and not set(pos[l]) & set(true[l])
    # each decoy's values are the public profile, largest first by its own order
    assert np.allclose(np.sort(np.abs(val[:, :SPEC.k]), axis=1)[:, ::-1], decoys.profile)


def test_the_card_asks_for_what_public_magnitudes_need() -> None:
    from protocol.model_card import _sparse_problems

    assert _sparse_problems(SPEC) == []
    for bad in (replace(SPEC, k_fake=7), replace(SPEC, value_bits=None, wire=None), replace(SPEC, decoys=None)):
        assert any("magnitudes 'key' needs" in p for p in _sparse_problems(bad))
    assert any("must be one of" in p for p in _sparse_problems(replace(SPEC, magnitudes="public")))


def test_public_magnitudes_need_the_decoy_codes() -> None:
    with pytest.raises(SparseCodeError, match="needs its decoy codes"):
        ambiguate(_dense(1)[0], SPEC, np.random.default_rng(0))


def test_decoy_files_that_do_not_fit_are_refused_in_one_line(decoys: CodeDecoys, tmp_path) -> None:
    decoys.save(tmp_path / "ok.npz")
    assert isinstance(read_decoys(tmp_path / "ok.npz", SPEC), CodeDecoys)
    assert decoy_fakes(None) is None
    bad = {"shape": dict(profile=np.ones((SPEC.L, SPEC.k + 1), np.float32)),
           "order": dict(profile=np.tile(np.arange(1, SPEC.k + 1, dtype=np.float32), (SPEC.L, 1))),
           "nan": dict(mu=np.full(SPEC.L * SPEC.m, np.nan, np.float32)),
           "variance": dict(resid=np.float32(-1))}
    for name, change in bad.items():
        parts = {"mu": decoys.mu, "basis": decoys.basis.astype(np.float16), "resid": np.float32(decoys.resid),
                 "profile": decoys.profile, **change}
        np.savez(tmp_path / f"{name}.npz", **parts)
        with pytest.raises(SparseCodeError) as exc:
            read_decoys(tmp_path / f"{name}.npz", SPEC)
        assert "\n" not in exc.value.message
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SparseCodeError, match="not decoy codes"):
        read_decoys(tmp_path / "junk.npz", SPEC)


def _scale_at() -> int:
    return 17 + (SPEC.L * SPEC.k_prime + 7) // 8 + 1  # header (17 B) | mask | value_bits | scale


@pytest.mark.parametrize("mutate, match", [
    (lambda k: k[:-1], "key body is"),
    (lambda k: k + b"\x00", "key body is"),
    (lambda k: k[:2] + b"\x07" + k[3:], "key version 7"),
    (lambda k: k[:-1] + bytes([k[-1] | 1]), "padding"),  # 3·6 levels of 5 bits: 6 padding bits
    (lambda k: k[:_scale_at() - 1] + b"\x0b" + k[_scale_at() - 1 + 1:], "value_bits 11"),
    (lambda k: k[:_scale_at()] + b"\x7e\x00" + k[_scale_at() + 2:], "magnitude scale nan"),
])
def test_hostile_version_2_keys_are_refused_in_one_line(decoys: CodeDecoys, mutate, match: str) -> None:
    amb, key = ambiguate(_dense(1, seed=3)[0], SPEC, np.random.default_rng(0), fakes=code_fakes(decoys))
    disambiguate(amb, key, SPEC.m)
    with pytest.raises(KeyMismatchError, match=match) as exc:
        disambiguate(amb, mutate(key), SPEC.m)
    assert "\n" not in exc.value.message


def test_a_version_1_key_still_decodes() -> None:
    spec = SparseSpec(L=3, m=64, k=6, k_fake=12, value_bits=6)
    code = _dense(1, seed=4)[0]
    amb, key = ambiguate(code, spec, np.random.default_rng(0))
    assert key[2] == 1 and np.array_equal(disambiguate(amb, key, spec.m) != 0, quantise_code(code, 6, 6) != 0)
