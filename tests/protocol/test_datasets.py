from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import InvalidInputError
from protocol.model_card import InputSpec
from protocol.preprocess import preprocess, normalize
from protocol.datasets import load_faces


def test_generic_layout_reads_labels_splits_and_matches_client_preprocessing(sample_faces, tmp_path):
    data = load_faces(sample_faces, cache_dir=tmp_path, progress=False)
    assert len(data) == 48 and data.pixels.shape == (48, 64, 64, 3)
    assert len(data.attr_names) == 40 and set(np.unique(data.splits)) == {0, 1, 2}
    assert len(data.subset("train")) == 32 and len(data.subset("test")) == 8
    # the training loader and the client produce the same input for the same photo
    spec = InputSpec()
    client_x = preprocess(sample_faces / "images" / data.filenames[0], spec)
    assert np.allclose(normalize(data.pixels[0], spec), client_x)
    # a second load comes from the cache and is identical
    again = load_faces(sample_faces, cache_dir=tmp_path, progress=False)
    assert np.array_equal(again.pixels, data.pixels)


def test_unknown_attribute_names_valid_ones(sample_faces, tmp_path):
    data = load_faces(sample_faces, cache_dir=tmp_path, progress=False)
    with pytest.raises(InvalidInputError, match="Smiling"):
        data.attr("Smling")


def test_corrupt_photo_is_skipped(sample_faces, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "images" / name).write_bytes((sample_faces / "images" / "000008.jpg").read_bytes())
    (root / "images" / "c.jpg").write_bytes(b"not a jpeg")
    (root / "labels.csv").write_text("filename,Smiling\na.jpg,1\nb.jpg,-1\nc.jpg,1\n")
    data = load_faces(root, cache_dir=tmp_path / "cache", progress=False)
    assert data.filenames == ["a.jpg", "b.jpg"] and data.attr("Smiling").tolist() == [1, 0]


@pytest.mark.slow
@pytest.mark.realdata
def test_celeba_layout_split_sizes(celeba_dir, tmp_path):
    data = load_faces(celeba_dir, spec=InputSpec(height=16, width=16), cache_dir=tmp_path, progress=False)
    assert len(data) == 10000
    assert [int((data.splits == s).sum()) for s in (0, 1, 2)] == [7032, 979, 1989]
    train_ids = set(data.subset("train").identities.tolist())
    assert not train_ids & set(data.subset("test").identities.tolist())
    assert 0.38 < data.attr("Male").mean() < 0.46
