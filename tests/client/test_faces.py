"""The client on photos as people take them: a model whose card has an alignment section
finds faces (protocol.align), sends one item per face (or the largest), skips photos
without a face and faces that cannot be aligned with one line, counts faces below
--min-face, and refuses a detector file that fails its hash."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import signed_models
from tests.conftest import write_tiny_features_model

ROOT = Path(__file__).resolve().parents[2]
DETECTOR = ROOT / "exported_models" / "face-detector"


def write_aligned_model(model_dir: Path, name: str = "tinyface") -> None:
    """The tiny features model with the shipped detector and the CelebA alignment."""
    from protocol.align import attach, default_alignment

    card = write_tiny_features_model(model_dir, name=name)
    attach(card, default_alignment(DETECTOR), DETECTOR, model_dir).save(model_dir)


@pytest.fixture
def aligned_dir(tmp_path: Path) -> Path:
    write_aligned_model(tmp_path / "tinyface")
    return tmp_path / "tinyface"


@pytest.fixture
def tiny_model_dir(tmp_path: Path, auditor) -> Path:
    """The collector of this module serves the aligned model, signed by the test auditor."""
    return signed_models(tmp_path / "models", auditor, "tinyface", write_aligned_model)


def scene(faces: list[tuple[Path, float, float, tuple[int, int]]], size=(500, 360)) -> Image.Image:
    photo = Image.new("RGB", size, (90, 110, 100))
    for path, deg, scale, (x, y) in faces:
        f = Image.open(path).convert("RGB")
        f = f.resize((round(f.width * scale), round(f.height * scale)), Image.Resampling.BICUBIC)
        photo.paste(f.rotate(deg, expand=True, resample=Image.Resampling.BICUBIC), (x, y),
                    Image.new("L", f.size, 255).rotate(deg, expand=True))
    return photo


@pytest.fixture
def photos(tmp_path: Path, sample_images: list[Path]) -> Path:
    """two.jpg: two faces; one.jpg: one face, turned; tiny.jpg: a face of ~25 px and one of
    ~60 px; none.jpg: no face; broken.jpg: not a photo."""
    d = tmp_path / "photos"
    d.mkdir()
    scene([(sample_images[0], 8, 1.0, (30, 60)), (sample_images[1], -5, 1.8, (250, 60))]).save(d / "two.jpg")
    scene([(sample_images[2], 6, 1.3, (150, 100))]).save(d / "one.jpg")
    scene([(sample_images[3], 0, 0.55, (40, 40)), (sample_images[4], 0, 1.4, (250, 100))]).save(d / "tiny.jpg")
    Image.new("RGB", (400, 300), (20, 160, 60)).save(d / "none.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return d


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_transform_sends_one_item_per_face_and_skips_with_one_line(cli, photos: Path, aligned_dir: Path, tmp_path):
    out = tmp_path / "f.npz"
    res = cli("transform", str(photos), "--model-dir", str(aligned_dir), "--out", str(out), "--min-face", "40",
              "--workers", "1")
    assert res.rc == 0, res.err
    z = _npz(out)
    names = [Path(n).name for n in z["file_names"]]
    # two.jpg: 2 faces (largest first); one.jpg: 1; tiny.jpg: the large face (the ~25 px one is counted)
    assert sorted(names) == ["one.jpg", "tiny.jpg", "two.jpg", "two.jpg"]
    assert [int(i) for n, i in zip(names, z["face_index"]) if n == "two.jpg"] == [0, 1]
    assert len(set(z["item_ids"].tolist())) == 4
    assert "4 faces transformed" in res.out and "2 skipped (errors), 1 faces below --min-face 40 px" in res.out
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert any("none.jpg" in line and "no face found" in line for line in lines)
    assert any("broken.jpg" in line for line in lines) and len(lines) == 2
    # the same photos give the same ids (resume), the largest face only gives face 0's
    again = tmp_path / "g.npz"
    assert cli("transform", str(photos), "--model-dir", str(aligned_dir), "--out", str(again), "--min-face", "40",
               "--workers", "3").rc == 0
    z2 = _npz(again)
    assert dict(zip(z2["item_ids"], z2["file_names"])) == dict(zip(z["item_ids"], z["file_names"]))
    assert np.allclose(z2["features"][np.argsort(z2["item_ids"])], z["features"][np.argsort(z["item_ids"])], atol=1e-6)
    largest = tmp_path / "l.npz"
    assert cli("transform", str(photos), "--model-dir", str(aligned_dir), "--out", str(largest),
               "--faces", "largest").rc == 0
    zl = _npz(largest)
    assert sorted(Path(n).name for n in zl["file_names"]) == ["one.jpg", "tiny.jpg", "two.jpg"]
    assert set(zl["item_ids"].tolist()) < set(z["item_ids"].tolist()) | set(zl["item_ids"].tolist())
    assert set(zl["face_index"].tolist()) == {0}


def test_a_face_found_in_a_turned_phone_photo_matches_the_upright_one(cli, photos: Path, aligned_dir: Path,
                                                                       tmp_path: Path):
    # EXIF orientation 6: stored turned, shown upright; features as for the upright photo
    img = Image.open(photos / "one.jpg")
    d = tmp_path / "exif"
    d.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(d / "turned.jpg", quality=95, exif=exif.tobytes())
    img.save(d / "upright.jpg", quality=95)
    out = tmp_path / "e.npz"
    assert cli("transform", str(d), "--model-dir", str(aligned_dir), "--out", str(out)).rc == 0
    z = _npz(out)
    assert len(z["features"]) == 2
    a, b = z["features"].reshape(2, -1)
    # the two JPEGs' landmarks differ by 0.49 px on average over the 48 sample faces (max 1.5),
    # which moves this tiny model's features a little; a photo left turned finds another face or none
    assert np.corrcoef(a, b)[0, 1] > 0.95


def test_a_detector_file_failing_its_hash_is_one_line_and_nothing_is_written(cli, photos: Path, aligned_dir: Path,
                                                                             tmp_path: Path):
    with open(aligned_dir / "pnet.onnx", "ab") as f:
        f.write(b"\0")
    out = tmp_path / "x.npz"
    res = cli("transform", str(photos), "--model-dir", str(aligned_dir), "--out", str(out))
    assert res.rc == 4 and "pnet.onnx" in res.err and "sha256" in res.err
    assert len(res.err.strip().splitlines()) == 1 and not out.exists()


def test_bad_face_options_are_one_line(cli, photos: Path, aligned_dir: Path, tmp_path: Path):
    res = cli("transform", str(photos), "--model-dir", str(aligned_dir), "--out", str(tmp_path / "x.npz"),
              "--min-face", "-3")
    assert res.rc == 2 and "--min-face" in res.err


def test_a_face_that_cannot_be_aligned_is_skipped_alone(aligned_dir: Path, photos: Path, monkeypatch):
    """A degenerate transform for one face: one line for it, the photo's other face goes on."""
    import protocol.align as align
    from client.models import open_model_dir
    from client.pipeline import Extractor

    real = align.face_transform

    def second_is_degenerate(landmarks, spec, where="face"):
        if where == "face 2":
            return real(np.zeros((5, 2)) + [[0, 0], [30, 0], [60, 0], [90, 0], [120, 0]], spec, where)
        return real(landmarks, spec, where)

    monkeypatch.setattr(align, "face_transform", second_is_degenerate)
    ex = Extractor(open_model_dir(aligned_dir), aligned_dir)
    skipped: list[tuple[str, str]] = []
    rows = [r for batch in ex.stream([photos / "two.jpg"], 8, lambda p, r: skipped.append((p, r))) for r in batch]
    assert [r.face for r in rows] == [0]
    assert len(skipped) == 1 and skipped[0][1].startswith("face 2: degenerate alignment transform")


@pytest.mark.slow
def test_upload_sends_each_face_once_and_resume_adds_only_the_missing_ones(cli, registered_home: Path, photos: Path,
                                                                            live_collector):
    home = str(registered_home)
    first = cli("--home", home, "upload", str(photos), "--yes", "--faces", "largest")
    assert first.rc == 0, first.err
    assert "3 stored, 0 already there, 2 skipped (errors), 0 faces below --min-face 20 px" in first.out
    second = cli("--home", home, "upload", str(photos), "--yes")
    assert second.rc == 0, second.err
    # the largest faces were sent already (same ids); the other faces of the photos are new
    assert "2 stored, 3 already there" in second.out
    third = cli("--home", home, "upload", str(photos), "--yes")
    assert "0 stored, 5 already there" in third.out


SHIPPED_ALIGNED = ROOT / "exported_models" / "pric-male-decision-aligned"
# features of a face cut from a reduced decode (≥ CUT_MARGIN pixels per model pixel) vs from
# the full decode: distance at most this fraction of the median distance between two faces'
# features (measured over 30 faces of 12-MP photos cut from their 1/2 and 1/4 decodes,
# pric-male: mean 0.15, max 0.27 from 1.25 to 2 pixels per model pixel; mean 0.21, max 0.37
# from 1 to 1.25; mean 0.09 from 2 to 3)
FEATURE_TOLERANCE = 0.35
# peak RSS growth allowed from 60 to 240 photos (a 12-MP photo's full decode is 34 MiB)
MEMORY_GROWTH_MIB = 16


def photo(face: Image.Image, bg: Image.Image, size: tuple[int, int], faces: list[tuple[float, tuple[int, int]]]) -> bytes:
    """A JPEG of `size`: a blurred background with `face` pasted at each (scale, position)."""
    from PIL import ImageFilter

    img = bg.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    for scale, at in faces:
        img.paste(face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.BICUBIC), at)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_a_face_cut_from_the_reduced_decode_releases_what_the_full_decode_would(sample_images: list[Path],
                                                                                 tmp_path: Path, decode_sizes):
    """Faces that the 1/2 decode of a 2000x1500 photo holds at CUT_MARGIN pixels per model
    pixel are cut from it (no full decode): their features (pric-male with the alignment,
    4x8x8) lie within FEATURE_TOLERANCE of those cut from the full decode, and the shipped
    aligned model's decision is the same for all of them but at most one."""
    import shutil

    from client.pipeline import Extractor
    from protocol.align import CUT_MARGIN, attach, default_alignment, face_transform, warp
    from protocol.model_card import load_card
    from protocol.preprocess import load_image, prepare

    src = ROOT / "exported_models" / "pric-male"
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp_path / f.name)
    card = attach(load_card(src, verify=False), default_alignment(DETECTOR), DETECTOR, tmp_path)
    feat = Extractor(card, tmp_path, threads=1)
    dec = Extractor(load_card(SHIPPED_ALIGNED), SHIPPED_ALIGNED, threads=1)
    assert feat.detail == pytest.approx(64 / 89, rel=1e-3) and dec.detail == feat.detail
    decodes = decode_sizes
    faces = [Image.open(p).convert("RGB") for p in sample_images]
    pixels = []
    for i in range(8):
        data = photo(faces[i], faces[-1 - i], (2000, 1500), [(1.9 + 0.15 * i, (300 + 150 * i, 500))])
        decodes.clear()
        got = [f for f in feat.aligner.photo(data, detail=feat.detail).faces if f.error is None and f.face.size < 600]
        assert len(got) == 1 and decodes == [(1000, 750)]  # cut from the detection's decode
        sim = face_transform(got[0].face.landmarks, card.alignment)
        assert 0.5 / (sim.scale * feat.detail) >= CUT_MARGIN
        ref = warp(load_image(data), sim, tuple(card.alignment.frame))
        pixels.append([prepare(got[0].image, card.input), prepare(ref, card.input)])
    x = np.array(pixels)  # (faces, reduced | full, H, W, 3)
    y = feat.transform(x.reshape(-1, *x.shape[2:])).reshape(len(x), 2, -1)
    full = y[:, 1]
    between = np.median([np.linalg.norm(a - b) for i, a in enumerate(full) for b in full[i + 1:]])
    moved = np.linalg.norm(y[:, 0] - y[:, 1], axis=1) / between
    assert moved.max() <= FEATURE_TOLERANCE, moved
    # a decision near the model's threshold flips under a small change of the input: 46 of 48
    # faces of 12-MP photos kept theirs when cut from a reduced decode (measured; a JPEG
    # re-encode at quality 95 of the full decode: 48 of 48)
    d = dec.transform(x.reshape(-1, *x.shape[2:])).reshape(len(x), 2)
    assert (d[:, 0] == d[:, 1]).sum() >= len(d) - 1, d


@pytest.mark.slow
def test_peak_memory_stays_flat_over_hundreds_of_photos_with_detection():
    """benchmarks/faces.py --memory in its own process: 240 mixed photos (12-MP ones among
    them) through the pipeline with detection; the peak RSS after 240 photos is within
    MEMORY_GROWTH_MIB of the peak after 60 (every photo kind has been seen by then)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faces.py"), "--model-dir", str(SHIPPED_ALIGNED),
                           "--memory", "240", "--checkpoints", "60,240"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    marks = [m for m in lines if "photos" in m]
    assert [m["photos"] for m in marks] == [0, 60, 240]
    assert lines[-1]["photos_streamed"] == 240
    assert lines[-1]["faces_sent"] >= 240 - 240 // 20  # every photo with a face sent at least one
    assert marks[2]["peak_rss_mib"] - marks[1]["peak_rss_mib"] < MEMORY_GROWTH_MIB, marks


@pytest.mark.slow
def test_a_sparse_code_card_with_alignment_sends_one_code_per_face(cli, photos: Path, tiny_export: Path,
                                                                  tmp_path: Path):
    import shutil

    from protocol.align import attach, default_alignment
    from protocol.model_card import load_card

    model = tmp_path / "sparse-aligned"
    shutil.copytree(tiny_export, model)
    attach(load_card(model), default_alignment(DETECTOR), DETECTOR, model).save(model)
    out = tmp_path / "s.npz"

    res = cli("transform", str(photos), "--model-dir", str(model), "--out", str(out), "--min-face", "40",
              "--workers", "1")

    assert res.rc == 0, res.err
    z = _npz(out)
    assert sorted(Path(n).name for n in z["file_names"]) == ["one.jpg", "tiny.jpg", "two.jpg", "two.jpg"]
    sp = load_card(model).sparse
    assert z["features"].shape == (4, sp.L, sp.m)
    assert ((z["features"] != 0).sum(-1) == sp.k).all()  # the true code: k non-zeros per map
