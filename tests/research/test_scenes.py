"""research.scenes: the scene photos the demo and the scene audit are made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from protocol.datasets import load_faces
from research.scenes import SCENE_SCALE, celeba_scenes, detector, faceless_background, one_face_scene


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
