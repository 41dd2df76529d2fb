"""The face detector: MTCNN weights from the facenet-pytorch wheel, exported to ONNX.

The export tests need the wheel (`make detector` downloads it into .cache/wheels, or set
PRIC_MTCNN_WHEEL); the tests of the shipped files need only the repository."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.errors import InvalidInputError
from protocol.faces import DetectorCard, FaceDetector
from training.detector.export import export_detector, sample_faces
from training.detector.nets import WEIGHT_FILES, load_nets

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "exported_models" / "face-detector"
SAMPLES = ROOT / "scripts" / "sample_faces"
WHEEL = Path(os.environ.get("PRIC_MTCNN_WHEEL", ROOT / ".cache/wheels/facenet_pytorch-2.6.0-py3-none-any.whl"))
needs_wheel = pytest.mark.skipif(not WHEEL.is_file(), reason=f"no facenet-pytorch wheel at {WHEEL} (make detector)")


@pytest.mark.slow
@needs_wheel
def test_export_reproduces_the_shipped_files_and_matches_torch(tmp_path):
    faces = sample_faces(SAMPLES, limit=8)
    card = export_detector(WHEEL, tmp_path, faces)
    shipped = DetectorCard.load(SHIPPED)
    # the same wheel gives the same bytes: the shipped hashes can be re-made by anyone
    assert card.spec.files == shipped.spec.files
    assert max(card.source["parity_max_abs_diff"].values()) <= 1e-4
    # and independently of the export's own check: the whole detector on sample faces,
    # O-Net outputs of torch vs the shipped ONNX on 48x48 crops of real faces
    nets = load_nets(WHEEL)
    x = np.stack([np.asarray(Image.fromarray(f).resize((48, 48)), np.float32) for f in faces]).transpose(0, 3, 1, 2)
    det = FaceDetector(shipped.spec, SHIPPED)
    with torch.no_grad():
        want = nets["onet"](torch.from_numpy(x.copy())).numpy()
    assert np.abs(det.onet(np.ascontiguousarray(x)) - want).max() < 1e-4


def test_weights_are_loaded_without_running_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member in WEIGHT_FILES.values():
            buf = io.BytesIO()
            torch.save({"x": Evil()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
            zf.writestr(member, buf.getvalue())
    with pytest.raises(InvalidInputError, match="cannot read MTCNN weights"):
        load_nets(wheel)
    assert not (tmp_path / "ran").exists()


def test_a_wheel_without_the_weights_is_one_line(tmp_path):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x.txt", "nothing")
    with pytest.raises(InvalidInputError, match="empty.whl: cannot read MTCNN weights"):
        load_nets(wheel)


def test_shipped_detector_finds_every_sample_face_with_plausible_landmarks():
    card = DetectorCard.load(SHIPPED)
    det = FaceDetector(card.spec, SHIPPED)
    files = sorted((SAMPLES / "images").glob("*.jpg"))[:16]  # ~40 ms each
    assert len(files) == 16
    for path in files:
        faces = det.detect(Image.open(path).convert("RGB"))
        assert len(faces) == 1, path.name
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = faces[0].landmarks
        # CelebA's aligned crops: eyes level, left of right, above the nose, above the mouth
        assert lx < nx < rx and abs(ly - ry) < 6 and max(ly, ry) < ny < min(mly, mry), path.name
        assert 12 < rx - lx < 30, path.name


def test_training_loader_aligns_exactly_as_the_client_does(tmp_path, sample_faces):
    """One owner for alignment: the pixels the model builder trains on are, byte for byte,
    the pixels the client sends for the same photo."""
    from protocol.align import Aligner, attach, default_alignment
    from protocol.datasets import load_faces
    from tests.conftest import write_tiny_features_model
    from client.pipeline import Extractor

    spec = default_alignment(SHIPPED)
    data = load_faces(sample_faces, limit=6, cache_dir=tmp_path / "cache", progress=False, announce=False,
                      aligner=Aligner(spec, SHIPPED))
    card = attach(write_tiny_features_model(tmp_path / "m"), spec, SHIPPED, tmp_path / "m")
    ex = Extractor(card, tmp_path / "m", faces="largest")
    plain = load_faces(sample_faces, limit=6, cache_dir=tmp_path / "cache", progress=False, announce=False)
    assert len(data.pixels) == 6
    for name, pixels, unaligned in zip(data.filenames, data.pixels, plain.pixels):
        path = sample_faces / "images" / name
        items = ex.decode_items(path.read_bytes(), path, "00" * 32)
        assert len(items) == 1
        assert np.array_equal(items[0][1][1], pixels)
        assert not np.array_equal(pixels, unaligned)  # and alignment did something


@pytest.mark.slow
def test_pric_train_align_records_the_alignment_on_the_card(tmp_path, sample_faces):
    from protocol.model_card import load_card
    from training.export import main as export_main
    from training.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--out", str(run), "--data", str(sample_faces), "--epochs", "1", "--max-batches", "1",
                       "--method", "entropy", "--min-class-photos", "1", "--align", str(SHIPPED),
                       "--no-progress"]) == 0
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out), "--name", "aligned"]) == 0
    card = load_card(out)  # verifies every file, the detector's included
    assert card.alignment is not None and card.alignment.detector.files == DetectorCard.load(SHIPPED).spec.files
    assert set(card.alignment.detector.files) <= set(card.extra_files)
