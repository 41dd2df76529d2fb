"""On device: a card with a decoy bank or decoy codes (sparse.decoys) and the compact wire form
(sparse.wire = "compact"): the bank is read only when its sha256 matches the card, fakes
come from it, and an item carries one uint8 array `code` that decodes to the drawn code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.pipeline import Extractor, ambiguate_output, wire_arrays_of
from protocol.errors import ModelIntegrityError
from protocol.model_card import load_card, sha256_file, wire_arrays
from protocol.sparse_code import CodeDecoys, build_decoy_bank, code_from_arrays, disambiguate, quantise_code, unpack_key

from tests.client.conftest import write_tiny_sparse_model


def _decoy_model(model_dir: Path) -> None:
    card = write_tiny_sparse_model(model_dir)
    sp = card.sparse
    codes = np.zeros((200, sp.L, sp.m), np.float32)
    codes[:, :, :20] = np.random.default_rng(0).normal(size=(200, sp.L, 20)) + 3.0  # true entries: first 20 positions
    build_decoy_bank(codes, sp.k, samples=8).save(model_dir / "decoys.npz")
    replace(card, sparse=replace(sp, value_bits=6, k_fake=8, decoys="decoys.npz", wire="compact"),
            extra_files={**card.extra_files, "decoys.npz": sha256_file(model_dir / "decoys.npz")}).validate().save(model_dir)


def test_fakes_come_from_the_bank_and_travel_compact(tmp_path: Path) -> None:
    _decoy_model(tmp_path / "m")
    card = load_card(tmp_path / "m")
    ext = Extractor(card, tmp_path / "m")
    assert ext.decoys is not None
    code = np.random.default_rng(1).normal(size=(card.sparse.L, card.sparse.m)).astype(np.float32)
    amb, key = ambiguate_output(card, code, ext.decoys)
    fakes = amb.indices[~unpack_key(key)[0]].astype(int)
    assert fakes.max() < 20  # only where the bank saw true entries

    arrays = wire_arrays_of(card, None, amb)
    (shape, dtype), = wire_arrays(card).values()
    assert set(arrays) == {"code"} and arrays["code"].shape == shape and str(arrays["code"].dtype) == dtype
    back = code_from_arrays(arrays, card.sparse)
    assert np.array_equal(disambiguate(back, key, card.sparse.m), disambiguate(amb, key, card.sparse.m))


def test_a_card_with_a_bank_never_falls_back_to_uniform_fakes(tmp_path: Path) -> None:
    _decoy_model(tmp_path / "m")
    card = load_card(tmp_path / "m")
    with pytest.raises(ModelIntegrityError, match="draws fakes from decoys.npz"):
        ambiguate_output(card, np.ones((card.sparse.L, card.sparse.m), np.float32))


def test_a_tampered_bank_is_refused(tmp_path: Path) -> None:
    _decoy_model(tmp_path / "m")
    card = load_card(tmp_path / "m")
    with np.load(tmp_path / "m" / "decoys.npz") as z:
        parts = dict(z)
    parts["freq"] = parts["freq"] * 0 + 0.5
    np.savez(tmp_path / "m" / "decoys.npz", **parts)
    with pytest.raises(ModelIntegrityError, match="sha256 differs"):
        Extractor(card, tmp_path / "m")


def _decoy_code_model(model_dir: Path) -> None:
    card = write_tiny_sparse_model(model_dir)
    sp = card.sparse
    dense = np.random.default_rng(0).normal(size=(300, sp.L, sp.m)).astype(np.float32)
    CodeDecoys.fit(dense, sp.k, rank=8).save(model_dir / "decoys.npz")
    replace(card, sparse=replace(sp, value_bits=6, k_fake=2 * sp.k, decoys="decoys.npz", wire="compact", magnitudes="key"),
            extra_files={**card.extra_files, "decoys.npz": sha256_file(model_dir / "decoys.npz")}).validate().save(model_dir)


def test_decoy_codes_on_device_send_public_magnitudes_and_key_the_true_ones(tmp_path: Path) -> None:
    _decoy_code_model(tmp_path / "m")
    card = load_card(tmp_path / "m")
    ext = Extractor(card, tmp_path / "m")
    assert isinstance(ext.decoys, CodeDecoys)
    code = np.random.default_rng(1).normal(size=(card.sparse.L, card.sparse.m)).astype(np.float32)
    amb, key = ambiguate_output(card, code, ext.decoys)
    mask = unpack_key(key)[0]
    mags = np.abs(amb.values.astype(np.float32))
    n = card.sparse.k_fake // card.sparse.k  # each decoy shows the same public magnitudes as the true code
    true_m = np.sort(mags[mask].reshape(card.sparse.L, -1))
    assert np.array_equal(np.sort(mags[~mask].reshape(card.sparse.L, -1)), np.sort(np.tile(true_m, n)))
    back = code_from_arrays(wire_arrays_of(card, None, amb), card.sparse)
    assert np.array_equal(disambiguate(back, key, card.sparse.m), quantise_code(code, card.sparse.k, 6))
    with pytest.raises(ModelIntegrityError, match="draws fakes from decoys.npz"):
        ambiguate_output(card, code)


@pytest.fixture
def tiny_model_dir(tmp_path: Path, auditor) -> Path:
    """The live collector serves the tiny sparse model with decoy codes (signed)."""
    from tests.client.conftest import signed_models

    return signed_models(tmp_path / "decoy-models", auditor, "tinysparse", _decoy_code_model)


def test_decoy_codes_end_to_end_upload_export_and_decode(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                         sample_images: list[Path]) -> None:
    """Upload (compact codes only), export the version-2 keys, decode: the key holder's
    images are the decoder's of the true code on its 6-bit grid."""
    import onnxruntime as ort
    import requests
    from PIL import Image

    from client.home import Home
    from client.pipeline import item_id_for, read_photo
    from protocol.preprocess import load_image, prepare
    from protocol.runtime import model_input

    images = sample_images[:4]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    home, codes = str(registered_home), tmp_path / "codes.npz"
    up = cli("--home", home, "upload", "--yes", str(folder), "--mode", "ambiguated", "--save-codes", str(codes))
    assert up.rc == 0, up.err
    assert up.out.strip().splitlines()[-1] == "4 stored, 0 already there, 0 skipped (errors)"
    card = load_card(live_collector.models_dir / "tinysparse")
    export = requests.get(f"{live_collector.url}/api/v1/export", params={"model_id": card.model_id},
                          headers={"Authorization": f"Bearer {live_collector.auditor_token}"}, timeout=10).json()
    assert len(export["items"]) == 4 and all(set(i["arrays"]) == {"code"} for i in export["items"])

    keyfile, out = tmp_path / "keys.json", tmp_path / "decoded"
    assert cli("--home", home, "keys", "export", "--out", str(keyfile)).rc == 0
    dec = cli("--home", home, "decode", "--key-file", str(keyfile), "--codes", str(codes), "--out", str(out))
    assert dec.rc == 0, dec.err

    model_dir = live_collector.models_dir / "tinysparse"
    enc = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    decm = ort.InferenceSession(str(model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = model_input(np.stack([prepare(load_image(p, card.input), card.input) for p in images]), card.input)
    true = np.stack([quantise_code(c, card.sparse.k, 6) for c in enc.run(["code"], {card.input.name: x})[0]])
    want = decm.run(["image"], {"code": true})[0]
    item_key = Home(registered_home).item_key()
    for n, p in enumerate(images):
        item = item_id_for(item_key, read_photo(p)[1], card.sha256)
        png = np.asarray(Image.open(out / f"{item}.png"), np.float32) / 255.0
        assert np.abs(png - np.moveaxis(want[n], 0, -1)).max() < 0.01
