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

from tests.client.conftest import sign_all
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
    models = tmp_path / "models"
    write_aligned_model(models / "tinyface")
    sign_all(models, auditor)
    return models


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
    assert np.corrcoef(a, b)[0, 1] > 0.97


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
    calls = {"n": 0}

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
