"""research.scenes: the scene photos the demo and the scene audit are made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol.datasets import load_faces
from protocol.errors import PricError
from protocol.model_card import load_card
from research.scenes import ROOT, SCENE_SCALE, celeba_scenes, detector, faceless_background, gap, one_face_scene


def test_a_faceless_background_holds_no_face_and_a_scene_one(sample_images: list[Path]):
    det = detector()
    rng = np.random.default_rng(0)
    for k in range(4):
        crop, other = (Image.open(p).convert("RGB") for p in (sample_images[k], sample_images[k + 10]))
        # the photo itself is a face; its shuffled, blurred tiles are not
        assert det.detect(other.resize((356, 436)))
        assert det.detect(faceless_background(other, (356, 436), rng)) == []
        scene = one_face_scene(crop, other, rng)
        assert scene.size == (89 * SCENE_SCALE, 109 * SCENE_SCALE)
        assert len(det.detect(scene)) >= 1


def test_celeba_scenes_keep_names_labels_and_split(sample_faces: Path, tmp_path: Path):
    out = tmp_path / "scenes"
    assert celeba_scenes(str(sample_faces), out, seed=0, limit=5)["scenes"] == 5
    src = load_faces(sample_faces, limit=5, progress=False, announce=False)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(src.filenames)
    assert Image.open(out / "images" / names[0]).size == (356, 436)
    scenes = load_faces(out, limit=5, progress=False, announce=False)  # the labels travel with the photos
    assert list(scenes.filenames) == list(src.filenames)
    assert np.array_equal(scenes.labels, src.labels) and np.array_equal(scenes.splits, src.splits)


class _Always:
    """A detector that finds a face in the first `n` images it is shown."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def detect(self, img: Image.Image) -> list:
        self.seen.append(img)
        return ["face"] if len(self.seen) <= self.n else []


def test_a_background_the_detector_still_finds_a_face_in_is_shuffled_again(sample_images: list[Path], monkeypatch):
    import research.scenes as scenes

    photo = Image.open(sample_images[0]).convert("RGB")
    det = _Always(scenes.BACKGROUND_TRIES // 4)
    monkeypatch.setattr(scenes, "detector", lambda: det)
    out = faceless_background(photo, (356, 436), np.random.default_rng(0))
    assert len(det.seen) == scenes.BACKGROUND_TRIES // 4 + 1 and out is det.seen[-1]
    # the next tries cut the photo into more, smaller tiles: a first try's shuffle is not repeated
    first = np.asarray(det.seen[0], np.float32)
    assert np.abs(np.asarray(out, np.float32) - first).mean() > 1

    monkeypatch.setattr(scenes, "detector", lambda: _Always(10 ** 6))
    with pytest.raises(PricError, match="no faceless background"):
        faceless_background(photo, (356, 436), np.random.default_rng(0))


def test_celeba_scenes_count_the_backgrounds_shuffled_again(sample_faces: Path, tmp_path: Path, monkeypatch):
    import research.scenes as scenes

    det = _Always(1)  # only the first background's first shuffle holds a "face"
    monkeypatch.setattr(scenes, "detector", lambda: det)
    out = celeba_scenes(str(sample_faces), tmp_path / "scenes", seed=0, limit=3)
    assert out["backgrounds_shuffled_again"] == 1 and out["background_shuffles_max"] == 2


def test_the_gap_compares_an_aligned_model_on_crops_and_on_their_scenes(sample_faces: Path, tmp_path: Path,
                                                                          monkeypatch):
    monkeypatch.setenv("PRIC_CACHE", str(tmp_path / "cache"))
    scenes = tmp_path / "scenes"
    celeba_scenes(str(sample_faces), scenes, seed=0)
    model = ROOT / "exported_models" / "pric-male-decision-aligned"
    (row,) = gap(str(sample_faces), [model], scenes, "Smiling", "test")
    test = int((load_faces(sample_faces, progress=False, announce=False).splits == 2).sum())
    assert row["model"] == load_card(model).model_id and row["split"] == "test"
    for what in ("crops", "scenes"):
        assert 0 < row[what]["photos"] <= test and 0 <= row[what]["accuracy"] <= 1
        lo, hi = row[what]["wilson_95"]
        assert lo <= row[what]["accuracy"] <= hi
    assert row["scenes_minus_crops"] == round(row["scenes"]["accuracy"] - row["crops"]["accuracy"], 4)
    with pytest.raises(PricError, match="no alignment section"):
        gap(str(sample_faces), [ROOT / "exported_models" / "pric-male-decision"], scenes, "Smiling", "test")
