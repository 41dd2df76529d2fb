"""protocol.faces (detector post-processing) and protocol.align (template, Umeyama, warp,
degenerate transforms, photos with several, small, turned or no faces)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.align import (CELEBA_FRAME, CELEBA_TEMPLATE, MAX_ANGLE, AlignmentSpec, Aligner, face_transform,
                            umeyama, warp)
from protocol.errors import FaceError, ImageError, ModelIntegrityError
from protocol.faces import DetectorCard, FaceDetector, nms, pyramid_scales, regress, square, windows_to_boxes

ROOT = Path(__file__).resolve().parents[2]
DETECTOR = ROOT / "exported_models" / "face-detector"
SAMPLES = sorted((ROOT / "scripts" / "sample_faces" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def aligner() -> Aligner:
    return Aligner(AlignmentSpec(detector=DetectorCard.load(DETECTOR).spec), DETECTOR)


def _turn(deg: float, scale: float, shift=(0.0, 0.0)) -> np.ndarray:
    a = math.radians(deg)
    return scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]), np.array(shift)


# --- NMS, pyramid, boxes ------------------------------------------------------------------
def test_nms_keeps_the_best_of_overlapping_boxes_and_separate_ones():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 59, 59], [0, 0, 4, 4]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]  # box 0 overlaps box 1 by IoU 0.67
    # "min": box 3 lies inside box 1, so it overlaps it fully by the smaller area
    assert nms(boxes, scores, 0.5, method="min").tolist() == [3, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0
    # a small face inside a large face's box (a photo of a face in the background) is kept
    # with a nesting bound, dropped without
    big_small = np.array([[0, 0, 299, 299], [100, 100, 139, 139]], np.float32)
    assert nms(big_small, np.array([0.99, 0.9]), 0.7, method="min").tolist() == [0]
    assert nms(big_small, np.array([0.99, 0.9]), 0.7, method="min", nested=1 / 9).tolist() == [0, 1]


def test_pyramid_reaches_the_smallest_and_the_largest_face():
    scales = pyramid_scales(480, 640, min_face=20, factor=0.709)
    assert scales[0] == pytest.approx(12 / 20)  # a 20 px face becomes P-Net's 12 px window
    assert all(b / a == pytest.approx(0.709) for a, b in zip(scales, scales[1:]))
    assert 480 * scales[-1] >= 12 > 480 * scales[-1] * 0.709  # down to a 12 px shorter side
    assert pyramid_scales(10, 10, 20, 0.709) == []


def test_pnet_windows_map_back_to_the_original_image():
    out = np.zeros((5, 4, 6), np.float32)
    out[4, 2, 3] = 0.9
    out[:4, 2, 3] = [0.1, 0.2, 0.3, 0.4]
    b = windows_to_boxes(out, scale=0.5, threshold=0.6)
    assert b.shape == (1, 9)
    # window (row 2, col 3) covers pixels [6, 18) x [4, 16) of the half-size image
    assert b[0, :4].tolist() == [math.floor(7 / 0.5), math.floor(5 / 0.5), math.floor(18 / 0.5), math.floor(16 / 0.5)]
    moved = regress(b[:, :4], b[:, 5:9], plus_one=False)
    assert moved[0, 0] == pytest.approx(b[0, 0] + 0.1 * (b[0, 2] - b[0, 0]))
    sq = square(np.array([[0, 0, 10, 20]], np.float32))
    assert sq[0].tolist() == [-5, 0, 15, 20]


# --- Umeyama and degenerate transforms ----------------------------------------------------
@pytest.mark.parametrize("deg,scale,shift", [(0, 1, (0, 0)), (13, 0.37, (5, -8)), (-40, 2.5, (100, 3)),
                                             (179, 1.1, (0, 0))])
def test_umeyama_recovers_a_known_similarity(deg, scale, shift):
    A, t = _turn(deg, scale, shift)
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    sim = umeyama(src, src @ A.T + t)
    assert np.allclose(sim.A, A) and np.allclose(sim.t, t)
    assert sim.scale == pytest.approx(scale) and sim.angle == pytest.approx(deg) and sim.rms < 1e-9


def test_umeyama_never_reflects():
    src = np.asarray(CELEBA_TEMPLATE)
    mirrored = src * [-1, 1]
    sim = umeyama(src, mirrored)
    assert np.linalg.det(sim.A) > 0 and sim.rms > 1


def _spec() -> AlignmentSpec:
    return AlignmentSpec(detector=DetectorCard.load(DETECTOR).spec)


def test_face_transform_maps_a_turned_face_onto_the_template():
    A, t = _turn(12, 3.0, (400, 300))
    photo_pts = np.asarray(CELEBA_TEMPLATE) @ A.T + t
    sim = face_transform(photo_pts, _spec())
    assert np.allclose(sim.apply(photo_pts), CELEBA_TEMPLATE, atol=1e-9)
    assert sim.scale == pytest.approx(1 / 3) and sim.angle == pytest.approx(-12)


@pytest.mark.parametrize("pts,match", [
    (np.asarray(CELEBA_TEMPLATE) * 0.1, "too small to align"),
    (np.full((5, 2), np.nan), "not 5 finite points"),
    (np.asarray(CELEBA_TEMPLATE)[:, ::-1] * [1, -1], "turned"),
    (np.asarray(CELEBA_TEMPLATE) * [-1, 1] + [100, 0], "fit the template"),          # mirrored face
    (np.array([[0, 0], [20, 0], [40, 0], [60, 0], [80, 0]], float), "fit the template"),  # collinear
])
def test_degenerate_landmarks_are_one_line(pts, match):
    with pytest.raises(FaceError, match=f"^face 2: .*{match}") as info:
        face_transform(pts, _spec(), "face 2")
    assert "\n" not in str(info.value)
    assert MAX_ANGLE < 90


def test_warp_of_a_known_transform_puts_the_landmarks_on_the_template():
    # a photo with bright dots at the template's points, turned and scaled up 5x: the warp
    # (with its box reduction) must bring each dot back to its template position
    A, t = _turn(-9, 5.0, (300, 200))
    photo = Image.new("RGB", (1000, 1000))
    pts = np.asarray(CELEBA_TEMPLATE) @ A.T + t
    arr = np.zeros((1000, 1000, 3), np.uint8)
    yy, xx = np.mgrid[0:1000, 0:1000]
    for x, y in pts:
        arr[(xx - x) ** 2 + (yy - y) ** 2 <= 36] = 255
    photo = Image.fromarray(arr)
    out = np.asarray(warp(photo, umeyama(pts, CELEBA_TEMPLATE), CELEBA_FRAME))[..., 0].astype(float)
    assert out.shape == (CELEBA_FRAME[1], CELEBA_FRAME[0])
    for x, y in CELEBA_TEMPLATE:
        x0, y0 = int(round(x)), int(round(y))
        win = out[y0 - 3:y0 + 4, x0 - 3:x0 + 4]
        cy, cx = np.unravel_index(np.argmax(win), win.shape)
        wy, wx = np.mgrid[-3:4, -3:4]
        centre = (float((win * wx).sum() / win.sum()) + x0, float((win * wy).sum() / win.sum()) + y0)
        assert math.dist(centre, (x, y)) < 0.6, (centre, (x, y))


# --- the card section ---------------------------------------------------------------------
def test_alignment_spec_round_trips_and_rejects_hostile_values():
    spec = _spec()
    assert AlignmentSpec.from_dict(spec.to_dict()) == spec and spec.problems() == []
    bad = spec.to_dict() | {"frame": [100000, 5], "template": [[1, 2]] * 4, "method": "affine"}
    problems = AlignmentSpec.from_dict(bad).problems()
    assert any("frame" in p for p in problems) and any("template" in p for p in problems)
    assert any("method" in p for p in problems)
    det = spec.to_dict()["detector"] | {"files": {"pnet.onnx": "0" * 64}, "min_face": 1, "thresholds": [2, 0, 0]}
    problems = AlignmentSpec.from_dict(spec.to_dict() | {"detector": det}).problems()
    assert len(problems) >= 3
    with pytest.raises(ModelIntegrityError, match="malformed"):
        AlignmentSpec.from_dict(spec.to_dict() | {"colour": "red"})


# --- the detector and photos --------------------------------------------------------------
def test_a_detector_file_failing_its_hash_is_refused(tmp_path):
    spec = DetectorCard.load(DETECTOR).spec
    for f in spec.files:
        (tmp_path / f).write_bytes((DETECTOR / f).read_bytes())
    (tmp_path / "rnet.onnx").write_bytes((DETECTOR / "rnet.onnx").read_bytes() + b"x")
    with pytest.raises(ModelIntegrityError, match="rnet.onnx: sha256 differs"):
        FaceDetector(spec, tmp_path)


def _scene(faces: list[tuple[Image.Image, float, float, tuple[int, int]]], size=(600, 400)) -> Image.Image:
    """A grey photo with faces pasted at (x, y), turned (degrees) and scaled."""
    scene = Image.new("RGB", size, (120, 130, 125))
    for face, deg, scale, (x, y) in faces:
        f = face.resize((round(face.width * scale), round(face.height * scale)), Image.Resampling.BICUBIC)
        mask = Image.new("L", f.size, 255).rotate(deg, expand=True)
        scene.paste(f.rotate(deg, expand=True, resample=Image.Resampling.BICUBIC), (x, y), mask)
    return scene


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_several_faces_are_found_aligned_largest_first(aligner):
    a, b = (Image.open(p).convert("RGB") for p in SAMPLES[:2])
    photo = _scene([(a, 10, 1.0, (40, 60)), (b, -8, 2.0, (300, 80))])
    got = aligner.photo(_jpeg(photo), "two.jpg")
    assert len(got.faces) == 2 and got.small == 0
    assert got.faces[0].face.size > got.faces[1].face.size  # largest first
    assert got.faces[0].face.box[0] > 250
    for f in got.faces:
        assert f.error is None and f.image.size == CELEBA_FRAME
        # aligned: the detector puts the landmarks of the aligned face near the template
        again = aligner.detector.detect(f.image)
        assert again and np.abs(again[0].landmarks - CELEBA_TEMPLATE).max() < 4
    assert len(aligner.photo(_jpeg(photo), which="largest").faces) == 1
    small = aligner.photo(_jpeg(photo), min_face=60)
    assert len(small.faces) == 1 and small.small == 1


def test_exif_orientation_is_honoured_before_detection(aligner):
    face = Image.open(SAMPLES[2]).convert("RGB")
    upright = _scene([(face, 0, 1.5, (200, 100))])
    # stored turned by 90 degrees, with the EXIF tag that turns it back
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    turned = aligner.photo(_jpeg(stored, orientation=6), "turned.jpg")
    plain = aligner.photo(_jpeg(upright), "upright.jpg")
    assert len(turned.faces) == 1 and len(plain.faces) == 1
    assert np.abs(turned.faces[0].face.landmarks - plain.faces[0].face.landmarks).max() < 3


def test_a_photo_without_a_face_gives_no_face_and_a_bad_photo_one_line(aligner):
    assert aligner.photo(_jpeg(Image.new("RGB", (300, 200), (10, 200, 30))), "grass.jpg").faces == []
    with pytest.raises(ImageError, match="^broken.jpg: "):
        aligner.photo(b"\xff\xd8 not a jpeg", "broken.jpg")


def test_large_photos_are_detected_reduced_and_cut_from_full_resolution(aligner, decode_sizes):
    decodes = decode_sizes
    face = Image.open(SAMPLES[3]).convert("RGB")
    big = _scene([(face, 5, 6.0, (1200, 900))], size=(4000, 3000))
    got = aligner.photo(_jpeg(big), "big.jpg")
    # one reduced-scale decode (JPEG draft, 1/4 here: 1000 px, detected on as it is) is
    # enough for a large face ...
    assert decodes == [(1000, 750)] and len(got.faces) == 1
    # ... which is reported in full-resolution pixels
    assert 1100 < got.faces[0].face.box[0] < 1500 and got.faces[0].face.size > 250
    # a small face has fewer pixels in the reduced decode than the frame needs: it is cut
    # from a full decode (made once per photo, after detection)
    decodes.clear()
    big = _scene([(face, 5, 6.0, (1200, 900)), (face, 0, 1.0, (200, 300)), (face, 0, 1.1, (3000, 300))],
                 size=(4000, 3000))
    got = aligner.photo(_jpeg(big), "big.jpg")
    assert len(got.faces) == 3 and all(f.error is None for f in got.faces)
    assert decodes == [(1000, 750), (4000, 3000)]


def test_a_face_is_cut_from_the_smallest_decode_that_holds_it_at_the_models_resolution(aligner, decode_sizes):
    """With the model's detail (64 px of an 89 px wide frame: 0.72), a face whose eyes are
    ~78 px apart in a 12-MP photo is cut from the 1/4 decode made for detection (no other
    decode); a face of ~100 px is still found and cut from the full decode, made once."""
    from protocol.align import model_detail
    from protocol.model_card import InputSpec

    decodes = decode_sizes
    detail = model_detail(CELEBA_FRAME, InputSpec(height=64, width=64, crop_box=(0.0, 10 / 109, 1.0, 99 / 109)))
    assert detail == pytest.approx(64 / 89)
    face = Image.open(SAMPLES[3]).convert("RGB")
    medium = _jpeg(_scene([(face, 5, 6.0, (1200, 900)), (face, 0, 4.0, (3000, 300))], size=(4000, 3000)))
    got = aligner.photo(medium, "medium.jpg", detail=detail)
    assert len(got.faces) == 2 and all(f.error is None for f in got.faces)
    assert decodes == [(1000, 750)]
    # the same photo for a model that keeps the whole frame: the smaller face needs the 1/2 decode
    decodes.clear()
    assert len(aligner.photo(medium, "medium.jpg").faces) == 2 and decodes == [(1000, 750), (2000, 1500)]
    decodes.clear()
    small = _jpeg(_scene([(face, 5, 6.0, (1200, 900)), (face, 0, 1.0, (200, 300)), (face, 0, 1.1, (3000, 300))],
                         size=(4000, 3000)))
    got = aligner.photo(small, "small.jpg", detail=detail)
    assert len(got.faces) == 3 and all(f.error is None for f in got.faces)
    assert min(f.face.size for f in got.faces) < 130  # the ~100 px faces, in full-resolution pixels
    assert decodes == [(1000, 750), (4000, 3000)]


def test_a_photo_stored_turned_gets_the_same_reduced_decodes_as_an_upright_one(aligner, decode_sizes):
    """A phone's portrait photo is stored landscape with an EXIF orientation: its drafts
    (compared by libjpeg in the stored orientation) are the upright photo's."""
    decodes = decode_sizes
    face = Image.open(SAMPLES[3]).convert("RGB")
    upright = _scene([(face, 0, 6.0, (900, 1200))], size=(3000, 4000))
    got = aligner.photo(_jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6), "portrait.jpg")
    assert len(got.faces) == 1 and decodes == [(750, 1000)]


def test_a_draft_between_the_detection_decode_and_the_full_one_is_used_when_it_suffices(aligner, decode_sizes):
    """A 48-MP photo is detected on its 1/8 decode; a face too small there and at 1/4 but
    large enough at 1/2 is cut from the 1/2 decode, not the full one."""
    decodes = decode_sizes
    face = Image.open(SAMPLES[3]).convert("RGB")
    photo = _jpeg(_scene([(face, 0, 2.6, (3000, 2000))], size=(8000, 6000)))
    got = aligner.photo(photo, "48mp.jpg", detail=64 / 89)
    assert len(got.faces) == 1 and got.faces[0].error is None
    assert decodes == [(1000, 750), (4000, 3000)]


# --- the model card's alignment section ---------------------------------------------------
def test_card_with_alignment_round_trips_and_binds_the_detector_files(tmp_path):
    from protocol.align import attach
    from protocol.attestation import model_files
    from protocol.model_card import ModelCard, load_card

    base = load_card(ROOT / "exported_models" / "pric-male-decision")
    card = attach(base, _spec())
    assert ModelCard.from_json(card.to_json()) == card
    assert set(_spec().detector.files) <= set(model_files(card))  # the attestation's subjects
    # a detector file the card does not also state (and so would not attest) is refused
    d = card.to_dict()
    d["extra_files"] = {}
    with pytest.raises(ModelIntegrityError, match="detector file onet.onnx must be in extra_files"):
        ModelCard.from_dict(d)
    # hostile sections: one line each
    for section in ("yes", {"detector": 5}, {"detector": d["alignment"]["detector"], "frame": "big"},
                    {"detector": d["alignment"]["detector"], "template": [[1e308 * 10, 0]] * 5}):
        with pytest.raises(ModelIntegrityError) as info:
            ModelCard.from_dict(card.to_dict() | {"alignment": section})
        assert "\n" not in str(info.value)


def test_old_cards_read_and_serialise_exactly_as_before():
    from protocol.model_card import load_card

    for name in ("pric-male", "pric-male-decision", "sparse-celeba"):
        folder = ROOT / "exported_models" / name
        card = load_card(folder, verify=False)
        assert card.alignment is None and "alignment" not in card.to_dict()
        assert card.to_json() == (folder / "model_card.json").read_text().rstrip("\n")
