"""The compact ambiguated code (protocol.sparse_code.pack_ambiguated) and the decoy bank
(DecoyBank, bank_fakes): round trip, strict decoding, and fakes that match the bank."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.model_card import SparseSpec
from protocol.sparse_code import (
    DecoyBank, SparseCodeError, ambiguate, ambiguated_size, bank_fakes, build_decoy_bank, compact_size, disambiguate,
    pack_ambiguated, unpack_ambiguated, unpack_key,
)

SPEC = SparseSpec(L=3, m=64, k=6, k_fake=6, value_bits=6)


def _code(seed: int, spec: SparseSpec = SPEC) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(spec.L, spec.m)).astype(np.float32)


def test_round_trip_is_exact_and_keys_still_apply() -> None:
    rng = np.random.default_rng(0)
    amb, key = ambiguate(_code(1), SPEC, rng)
    data = pack_ambiguated(amb, SPEC)
    back = unpack_ambiguated(data, SPEC)

    assert len(data) == ambiguated_size(SPEC)
    assert np.array_equal(back.indices, amb.indices) and np.array_equal(back.values, amb.values)
    assert back.fingerprint() == amb.fingerprint()  # the owner's key applies to the decoded wire code
    assert np.array_equal(disambiguate(back, key, SPEC.m), disambiguate(amb, key, SPEC.m))


def test_size_is_header_plus_support_and_value_bits() -> None:
    bits = (math.comb(64, 12) ** 3 - 1).bit_length() + 3 * 12 * 6
    assert ambiguated_size(SPEC) == 3 + math.ceil(bits / 8)
    celeba = SparseSpec(L=8, m=256, k=24, k_fake=24, value_bits=6)
    assert ambiguated_size(celeba) <= 2 * compact_size(celeba)  # the issue's wire goal at k' = 2k
    assert ambiguated_size(celeba) < celeba.L * celeba.k_prime * 4 / 3  # vs uint16 index + float16 value


def _wire() -> bytes:
    return pack_ambiguated(ambiguate(_code(2), SPEC, np.random.default_rng(3))[0], SPEC)


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:-1], "bytes, expected"),
    (lambda b: b + b"\0", "bytes, expected"),
    (lambda b: bytes([1]) + b[1:], "version 1 is not supported"),
    (lambda b: b[:1] + b"\x7c\x00" + b[3:], "scale inf"),
    (lambda b: b[:1] + b"\xbc\x00" + b[3:], "scale -1.0"),
    (lambda b: b[:3] + b"\xff" * (len(b) - 3), "out of range|padding"),
])
def test_hostile_wire_codes_are_refused_in_one_line(mutate, match: str) -> None:
    with pytest.raises(SparseCodeError, match=match) as exc:
        unpack_ambiguated(mutate(_wire()), SPEC)
    assert "\n" not in str(exc.value)


def test_a_support_number_beyond_the_maps_is_refused() -> None:
    spec = SparseSpec(L=1, m=8, k=2, k_fake=2, value_bits=4)  # support 7 bits (C(8,4) = 70 < 128), values 16
    body = (100 << 16) << 1  # support number 100 >= 70, zero values, one padding bit
    data = bytes([2]) + np.float16(1.0).astype(">f2").tobytes() + body.to_bytes(3, "big")
    with pytest.raises(SparseCodeError, match="outside code maps of length 8"):
        unpack_ambiguated(data, spec)


def test_the_compact_wire_form_needs_value_bits() -> None:
    with pytest.raises(SparseCodeError, match="value_bits"):
        ambiguated_size(SparseSpec(L=1, m=8, k=2, k_fake=2))


def test_bank_fakes_sit_where_true_entries_sit_and_take_their_values() -> None:
    """A code family whose true support is always among the first 12 positions: uniform
    fakes land anywhere, bank fakes only where true entries were seen, so the position of
    an entry no longer tells a true one from a fake."""
    rng = np.random.default_rng(0)
    spec = SparseSpec(L=2, m=64, k=4, k_fake=4, value_bits=6)
    codes = np.zeros((300, 2, 64), np.float32)
    codes[:, :, :12] = rng.normal(size=(300, 2, 12)) + np.sign(rng.normal(size=(300, 2, 12))) * 2
    bank = build_decoy_bank(codes, spec.k, samples=16)
    assert bank.freq[:, 12:].max() == 0 and bank.freq.sum(axis=1) == pytest.approx(spec.k)

    draw = bank_fakes(bank)
    uniform_out, bank_out = 0, 0
    for i in range(40):
        c = codes[i]
        a_u, k_u = ambiguate(c, spec, rng)
        a_b, k_b = ambiguate(c, spec, rng, fakes=draw)
        fake_u = a_u.indices[~unpack_key(k_u)[0]].astype(int)
        fake_b = a_b.indices[~unpack_key(k_b)[0]].astype(int)
        uniform_out += int((fake_u >= 12).sum())
        bank_out += int((fake_b >= 12).sum())
        assert np.array_equal(disambiguate(a_b, k_b, spec.m) != 0, np.abs(c) >= np.sort(np.abs(c), axis=1)[:, [-4]])
    assert bank_out == 0 and uniform_out > 100


def test_a_bank_that_does_not_fit_the_card_is_refused(tmp_path) -> None:
    bank = build_decoy_bank(np.random.default_rng(0).normal(size=(20, 2, 16)).astype(np.float32), 3, samples=4)
    bank.save(tmp_path / "decoys.npz")
    assert DecoyBank.load(tmp_path / "decoys.npz", SparseSpec(L=2, m=16, k=3, k_fake=3)).values.shape == (2, 16, 4)
    with pytest.raises(SparseCodeError, match="do not fit L=3, m=16"):
        DecoyBank.load(tmp_path / "decoys.npz", SparseSpec(L=3, m=16, k=3, k_fake=3))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SparseCodeError, match="not a decoy bank"):
        DecoyBank.load(tmp_path / "bad.npz", SparseSpec(L=2, m=16, k=3, k_fake=3))
