"""Ambiguated mode end to end with a tiny `sparse_code` model: upload only the
ambiguated code, keep the key (mode 0600), export keys, decode with the right key,
refuse a wrong one."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from PIL import Image

from client.home import Home
from client.pipeline import item_id_for, read_photo
from protocol.model_card import load_card
from protocol.preprocess import load_image, prepare
from protocol.runtime import model_input


@pytest.fixture
def tiny_model_dir(sparse_models_dir: Path) -> Path:
    """The live collector serves the tiny sparse model instead of the features one."""
    return sparse_models_dir


def _folder(tmp_path: Path, images: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_ambiguated_upload_keys_export_and_decode(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                  sample_images: list[Path]) -> None:
    images = sample_images[:6]
    folder = _folder(tmp_path, images)
    home = str(registered_home)
    codes = tmp_path / "codes.npz"

    up = cli("--home", home, "upload", "--yes", str(folder), "--mode", "ambiguated", "--save-codes", str(codes))
    assert up.rc == 0, up.err
    assert up.out.strip().splitlines()[-1] == "6 stored, 0 already there, 0 skipped (errors)"
    keys_db = registered_home / "keys.sqlite"
    assert stat.S_IMODE(keys_db.stat().st_mode) == 0o600

    card = load_card(live_collector.models_dir / "tinysparse")
    sp = card.sparse
    with np.load(codes, allow_pickle=False) as z:
        ids, ind, val = list(z["item_ids"]), z["indices"], z["values"]
        assert str(z["model_id"]) == card.model_id
    assert ind.shape == val.shape == (6, sp.L, sp.k_prime) and ind.dtype == np.uint16 and val.dtype == np.float16

    # the collector holds exactly the saved public codes (and no dense code)
    export = requests.get(f"{live_collector.url}/api/v1/export", params={"model_id": card.model_id},
                          headers={"Authorization": f"Bearer {live_collector.auditor_token}"}, timeout=10).json()
    assert sorted(i["item_id"] for i in export["items"]) == sorted(ids)
    assert all(set(i["arrays"]) == {"indices", "values"} for i in export["items"])

    keyfile = tmp_path / "keys.json"
    ex = cli("--home", home, "keys", "export", "--out", str(keyfile))
    assert ex.rc == 0 and "6 keys" in ex.out
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600

    out = tmp_path / "decoded"
    dec = cli("--home", home, "decode", "--key-file", str(keyfile), "--codes", str(codes), "--out", str(out))
    assert dec.rc == 0, dec.err
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)

    # authorised decode = decoder(true code), up to float16 storage of values and PNG rounding
    model_dir = live_collector.models_dir / "tinysparse"
    enc = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    decm = ort.InferenceSession(str(model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = model_input(np.stack([prepare(load_image(p, card.input), card.input) for p in images]), card.input)
    true_img = decm.run(["image"], {"code": enc.run(["code"], {card.input.name: x})[0]})[0]
    item_key = Home(registered_home).item_key()
    id_by_name = {p.name: item_id_for(item_key, read_photo(p)[1], card.sha256) for p in images}
    for n, p in enumerate(images):
        png = np.asarray(Image.open(out / f"{id_by_name[p.name]}.png"), np.float32) / 255.0
        assert np.abs(png - np.moveaxis(true_img[n], 0, -1)).max() < 0.02

    # without the journal (as after a crash), the kept codes are re-sent, not redrawn
    for f in registered_home.glob("journal.sqlite*"):
        f.unlink()
    codes2 = tmp_path / "codes2.npz"
    again = cli("--home", home, "upload", "--yes", str(folder), "--save-codes", str(codes2))
    assert again.out.strip().splitlines()[-1] == "0 stored, 6 already there, 0 skipped (errors)"
    with np.load(codes2, allow_pickle=False) as z:
        order = [ids.index(i) for i in z["item_ids"]]
        np.testing.assert_array_equal(z["indices"], ind[order])
        np.testing.assert_array_equal(z["values"], val[order])


def test_wrong_key_is_refused_and_nothing_written(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                  sample_images: list[Path]) -> None:
    folder = _folder(tmp_path, sample_images[:3])
    home = str(registered_home)
    codes = tmp_path / "codes.npz"
    assert cli("--home", home, "upload", "--yes", str(folder), "--save-codes", str(codes)).rc == 0
    keyfile = tmp_path / "keys.json"
    assert cli("--home", home, "keys", "export", "--out", str(keyfile)).rc == 0
    doc = json.loads(keyfile.read_text())
    a, b, c = sorted(doc["keys"])
    doc["keys"][a], doc["keys"][b] = doc["keys"][b], doc["keys"][a]  # swap two photos' keys
    keyfile.write_text(json.dumps(doc))

    out = tmp_path / "decoded"
    res = cli("--home", home, "decode", "--key-file", str(keyfile), "--codes", str(codes), "--out", str(out))

    assert res.rc == 5
    refused = [l for l in res.err.splitlines() if "refused" in l]
    assert len(refused) == 2 and any(a in l for l in refused) and any(b in l for l in refused)
    assert "different code" in res.err
    assert sorted(p.stem for p in out.glob("*.png")) == [c]


def test_features_mode_against_a_sparse_model_is_refused(cli, registered_home: Path, tmp_path: Path,
                                                         sample_images: list[Path]) -> None:
    folder = _folder(tmp_path, sample_images[:2])
    res = cli("--home", str(registered_home), "upload", "--yes", str(folder), "--mode", "features")
    assert res.rc == 2 and "sparse_code" in res.err


def test_decode_never_writes_outside_out(cli, registered_home: Path, live_collector, tmp_path: Path,
                                         sample_images: list[Path]) -> None:
    """Output names come from ids inside the codes file (issue 16, item 7): an id with
    `../`, an absolute path or a newline is refused in one line; the others are written."""
    folder = _folder(tmp_path, sample_images[:4])
    home = str(registered_home)
    codes = tmp_path / "codes.npz"
    assert cli("--home", home, "upload", "--yes", str(folder), "--save-codes", str(codes)).rc == 0
    keyfile = tmp_path / "keys.json"
    assert cli("--home", home, "keys", "export", "--out", str(keyfile)).rc == 0
    with np.load(codes, allow_pickle=False) as z:
        ids, ind, val, model_id = list(z["item_ids"]), z["indices"], z["values"], z["model_id"]
    hostile = ["../escape", str(tmp_path / "absolute"), "x\n0 images written"]
    renamed = hostile + ids[3:]
    np.savez(codes, item_ids=np.array(renamed), indices=ind, values=val, model_id=model_id)
    doc = json.loads(keyfile.read_text())
    doc["keys"] = {new: doc["keys"][old] for old, new in zip(ids, renamed)}
    keyfile.write_text(json.dumps(doc))

    out = tmp_path / "decoded"
    res = cli("--home", home, "decode", "--key-file", str(keyfile), "--codes", str(codes), "--out", str(out))

    assert res.rc == 2, res.err
    err_lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(err_lines) == 3 and all("cannot be a file name" in line for line in err_lines)
    assert "x\\n0 images written" in res.err
    assert sorted(p.name for p in out.iterdir()) == [f"{ids[3]}.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == []
    assert res.out.strip() == f"1 images written to {out}, 3 refused"
