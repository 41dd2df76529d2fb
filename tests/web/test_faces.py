"""Faces in the page: for a card with an alignment section the page runs the card's face
detector (its three ONNX files, checked against the attested card) and aligns each face as
the Python client does (protocol/faces.py and protocol/align.py ported to faces.js), one
item per face with the client's per-face item ids. Parity: the same faces (count and
order) and aligned model inputs within ALIGNED_MAX_LEVELS of the client's."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from client.pipeline import Extractor, face_digest, item_id_for
from protocol import routes
from protocol.align import attach, default_alignment
from protocol.model_card import load_card
from protocol.wire import decode_batch_binary

from .conftest import ROOT
from .test_flow import wait_flag

pytestmark = [pytest.mark.browser, pytest.mark.slow]
DETECTOR_DIR = ROOT / "exported_models" / "face-detector"
SAMPLES = ROOT / "scripts" / "sample_faces" / "images"
# aligned inputs of the page vs the client's, levels of the uint8 input (measured: at most 1,
# from the bilinear warp's last rounding where onnxruntime-web's landmarks differ in the
# last float bits; mean below 0.001)
ALIGNED_MAX_LEVELS = 2
ALIGNED_MEAN_LEVELS = 0.01
MEASURED = {"kind": "features",
            "private": {"attribute": "Male", "strongest_accuracy": 0.62, "ci95": [0.60, 0.64], "majority_rate": 0.58,
                        "label_floor": 0.60, "strongest": "cnn", "n_test": 1989},
            "primary": {"Smiling": {"accuracy": 0.88}}, "reconstruction": {"psnr": 13.5, "ssim": 0.21},
            "reid": {"rank1": 0.01, "chance_rank1": 0.001},
            "per_person": {"photos": [1, 4, 16, 64], "accuracy": [0.62, 0.66, 0.72, 0.80]}}

PAGE = """async ([token]) => {
  const api = await import('/app/static/js/api.js');
  const P = await import('/app/static/js/photos.js');
  const card = await api.modelCard(token);
  const files = {};
  for (const n of ['pnet.onnx', 'rnet.onnx', 'onet.onnx']) files[n] = (await api.modelFile(token, card.model_id, n)).data;
  let refused = '';
  try { await P.loadDetector(card, { ...files, 'rnet.onnx': files['pnet.onnx'] }); } catch (e) { refused = e.message; }
  let badCard = '';
  try { await P.loadDetector({ ...card, alignment: { ...card.alignment, detector: { ...card.alignment.detector, factor: 1 } } }, files); } catch (e) { badCard = e.message; }
  const detector = await P.loadDetector(card, files);
  const out = { refused, badCard, photos: {} };
  for (const f of Array.from(document.getElementById('faces').files)) {
    const got = await P.photoItems(new Uint8Array(await f.arrayBuffer()), card, detector);
    out.photos[f.name] = got.items.map((it) => { let s = ''; for (let i = 0; i < it.pixels.length; i += 0x8000) s += String.fromCharCode(...it.pixels.subarray(i, i + 0x8000)); return [it.face, btoa(s)]; });
  }
  return out;
}"""


def aligned_model(models: Path) -> Path:
    """pric-male-decision with the CelebA alignment (as `python -m research.scenes attach`)."""
    src = ROOT / "exported_models" / "pric-male-decision"
    out = models / "aligned"
    out.mkdir(parents=True)
    card = load_card(src)
    for name in [card.file, *card.extra_files]:
        shutil.copyfile(src / name, out / name)
    card = dataclasses.replace(card, version=f"{card.version}+aligned")
    attach(card, default_alignment(DETECTOR_DIR), DETECTOR_DIR, out).save(out)
    return out


def sign(model_dir: Path, keys: Path) -> Path:
    """A throw-away auditor signs the card; the collector and the page trust its key."""
    from protocol.attestation import (
        build_statement,
        generate_key,
        load_private_key,
        save_envelope,
    )
    from protocol.attestation import sign as sign_statement

    keys.mkdir(parents=True)
    pub = generate_key(keys / "k.pem", keys / "k.pub.json", "Test Auditor")
    st = build_statement(load_card(model_dir), model_dir, measured=MEASURED, thresholds={"max_psnr": 20.0},
                         data={"name": "celeba-10k", "split": "test", "n_test": 1989}, auditor=pub, date="2025-01-02")
    save_envelope(model_dir, sign_statement(st, load_private_key(keys / "k.pem")))
    return keys / "k.pub.json"


def scenes(tmp: Path, n: int) -> list[Path]:
    """n scenes of 2 sample faces each (the shipped celeba crops, scaled up) on a blurred
    background; one of them as a 12-MP photo (detection on its 1/4 JPEG draft, searched at
    DETECT_SIDE's scales, its large faces cut from that draft); and a 12-MP photo of two
    small faces, stored upright and stored turned (EXIF orientation 6): one face cut from
    the 1/2 draft, the smaller from the full decode."""
    faces = sorted(SAMPLES.glob("*.jpg"))
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        bg = Image.open(faces[(3 * k) % len(faces)]).convert("RGB").resize((520, 400)).filter(ImageFilter.GaussianBlur(8))
        for j, x in enumerate((30, 280)):
            face = Image.open(faces[(3 * k + j + 1) % len(faces)]).convert("RGB")
            s = float(rng.uniform(1.4, 2.2))
            face = face.resize((int(89 * s), int(109 * s)), Image.Resampling.BICUBIC)
            bg.paste(face, (x + int(rng.integers(0, 20)), int(rng.integers(0, 400 - face.height))))
        path = tmp / f"scene{k}.jpg"
        bg.save(path, quality=92)
        out.append(path)
    big = tmp / "scene-12mp.jpg"
    Image.open(out[0]).resize((4000, 3077), Image.Resampling.BICUBIC).save(big, quality=90)
    noise = rng.integers(60, 200, (30, 40, 3), dtype=np.uint8)
    bg = Image.fromarray(noise).resize((4000, 3000), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(20))
    for j, (x, y, s) in enumerate(((600, 900, 2.6), (2600, 1500, 1.5))):
        face = Image.open(faces[j + 7]).convert("RGB")
        bg.paste(face.resize((int(89 * s), int(109 * s)), Image.Resampling.BICUBIC), (x, y))
    small = tmp / "scene-12mp-small.jpg"
    bg.save(small, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: shown upright after a 90° clockwise turn
    turned = tmp / "scene-12mp-small-turned.jpg"
    bg.transpose(Image.Transpose.ROTATE_90).save(turned, quality=90, exif=exif)
    return [*out, big, small, turned]


@pytest.fixture
def aligned(tmp_path, monkeypatch):
    models = tmp_path / "models"
    model_dir = aligned_model(models)
    pub = sign(model_dir, tmp_path / "keys")
    (models / "trusted-auditors").mkdir()
    shutil.copyfile(pub, models / "trusted-auditors" / "test.json")
    monkeypatch.setattr("collector.web.RELEASE_KEY_FILE", pub)  # the page's trust anchor
    return models, model_dir


def compare(got: dict, files: list[Path], ext: Extractor) -> int:
    n = 0
    for path in files:
        data = path.read_bytes()
        items = ext.decode_items(data, path, hashlib.sha256(data).hexdigest())
        ours = [out for _, out in items if isinstance(out, tuple)]
        theirs = got[path.name]
        assert [i for i, _ in ours] == [i for i, _ in theirs], f"{path.name}: faces {len(ours)} vs page {len(theirs)}"
        for (_, a), (_, b64) in zip(ours, theirs):
            b = np.frombuffer(base64.b64decode(b64), np.uint8).reshape(a.shape)
            diff = np.abs(a.astype(int) - b.astype(int))
            assert diff.max() <= ALIGNED_MAX_LEVELS and diff.mean() <= ALIGNED_MEAN_LEVELS, (path.name, diff.max(), diff.mean())
            n += 1
    return n


def test_page_finds_and_aligns_faces_as_the_client(live, page_of, tmp_path, aligned):
    models, model_dir = aligned
    card = load_card(model_dir)
    lv = live(MODELS_DIR=str(models), CURRENT_MODEL=card.model_id)
    files = scenes(tmp_path, 6)
    page = page_of(lv)
    page.goto(lv.url + "/app/")
    page.wait_for_selector("#join:not([hidden])")
    page.click("#join-btn")
    page.wait_for_selector("#agree-btn:not([hidden])")
    page.click("#agree-btn")
    page.wait_for_selector("#photos:not([hidden])")
    me = page.evaluate("() => ({token: window.pric.me.token, key: Array.from(window.pric.me.item_key)})")

    # parity of the detector and the aligner, face by face; a detector file that is not the
    # card's is refused before onnxruntime sees it
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'faces'; document.body.append(i); }")
    page.set_input_files("#faces", [str(p) for p in files])
    got = page.evaluate(PAGE, [me["token"]])
    assert "rnet.onnx" in got["refused"] and "not the card's" in got["refused"]
    assert "factor must be a number in [0.3, 0.9]" in got["badCard"]  # a pyramid that would never end
    ext = Extractor(card, model_dir)
    n = compare(got["photos"], files, ext)
    assert n >= 2 * len(files)  # the two pasted faces of each scene at least

    # the page's own flow: one item per face, the client's per-face ids, the client's outputs
    page.set_input_files("#files", [str(p) for p in files])
    wait_flag(page, "ready")
    state = page.text_content("#photo-state")
    assert f"{n} to send" in state and f"{n} face(s) found" in state, state
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    assert f"Uploaded {n}" in page.text_content("#alert"), page.text_content("#alert")
    key = bytes(me["key"])
    expected = {}
    for path in files:
        data = path.read_bytes()
        photo = hashlib.sha256(data).hexdigest()
        for _, out in ext.decode_items(data, path, photo):
            index, pixels = out
            expected[item_id_for(key, face_digest(photo, index), card.sha256)] = ext.transform(pixels[None])[0]
    sent = {}
    for r in lv.requests:
        if r["method"] == "POST" and r["url"] == lv.url + routes.ITEMS:
            for item in decode_batch_binary(r["body"]).items:
                sent[item.item_id] = item.arrays["feature"]
    assert set(sent) == set(expected)
    assert max(float(np.abs(sent[i] - expected[i]).max()) for i in sent) < 1e-4


@pytest.mark.realdata
def test_scenes_parity(live, page_of, tmp_path, aligned):
    """research.scenes' scenes (celeba-10k test faces pasted turned and scaled on blurred
    backgrounds, 1-3 faces each), a bounded number."""
    from protocol.datasets import default_data_dir

    if not (default_data_dir() / "list_eval_partition.txt").is_file():
        pytest.skip(f"{default_data_dir()}: celeba-10k is not there")
    from research.scenes import main as scenes_main

    assert scenes_main(["make", "--out", str(tmp_path / "scenes"), "--n", "16", "--seed", "3"]) == 0
    files = sorted((tmp_path / "scenes" / "images").glob("*.jpg"))
    models, model_dir = aligned
    card = load_card(model_dir)
    lv = live(MODELS_DIR=str(models), CURRENT_MODEL=card.model_id)
    token = lv.app.test_client().post("/api/v1/participants").get_json()["token"]
    page = page_of(lv)
    page.goto(lv.url + "/app/")
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'faces'; document.body.append(i); }")
    page.set_input_files("#faces", [str(p) for p in files])
    got = page.evaluate(PAGE, [token])
    n = compare(got["photos"], files, Extractor(card, model_dir))
    assert n >= len(files)
