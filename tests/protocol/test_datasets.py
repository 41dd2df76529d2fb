from __future__ import annotations

from types import SimpleNamespace

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


def test_a_photo_written_again_under_its_name_is_prepared_again_not_read_from_the_cache(sample_faces, tmp_path):
    import os
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(sample_faces, root)
    first = load_faces(root, cache_dir=tmp_path / "c", progress=False, announce=False)
    name = first.filenames[0]
    other = first.filenames[1]
    shutil.copyfile(root / "images" / other, root / "images" / name)
    st = (root / "images" / name).stat()
    os.utime(root / "images" / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    again = load_faces(root, cache_dir=tmp_path / "c", progress=False, announce=False)
    i, j = again.filenames.index(name), again.filenames.index(other)
    assert not np.array_equal(first.pixels[i], again.pixels[i])
    assert np.array_equal(again.pixels[i], again.pixels[j])


def test_the_cache_is_keyed_by_the_code_that_prepares_the_photos(sample_faces, tmp_path, monkeypatch):
    """Aligned photos cached before a change to detection (a pyramid made another way) must
    not be read after it: an audit would measure other pixels than a device sends."""
    import shutil

    import protocol.datasets as datasets

    code = tmp_path / "protocol"
    code.mkdir()
    for module in datasets.PREPARING_CODE:
        shutil.copyfile(datasets.PROTOCOL_DIR / module, code / module)
    monkeypatch.setattr(datasets, "PROTOCOL_DIR", code)
    files = ["000008.jpg"]
    aligner = SimpleNamespace(spec=SimpleNamespace(to_dict=lambda: {"frame": [89, 109]}))
    before = {k: datasets._cache_key(sample_faces, InputSpec(), files, a) for k, a in (("plain", None), ("aligned", aligner))}
    with open(code / "faces.py", "a") as fh:
        fh.write("\n# another pyramid\n")
    assert datasets._cache_key(sample_faces, InputSpec(), files, aligner) != before["aligned"]
    assert datasets._cache_key(sample_faces, InputSpec(), files, None) == before["plain"]  # faces.py is not read there
    with open(code / "preprocess.py", "a") as fh:
        fh.write("\n# another resize\n")
    assert datasets._cache_key(sample_faces, InputSpec(), files, None) != before["plain"]


def test_unknown_attribute_names_valid_ones(sample_faces, tmp_path):
    data = load_faces(sample_faces, cache_dir=tmp_path, progress=False)
    with pytest.raises(InvalidInputError, match="Smiling"):
        data.attr("Smling")


def test_corrupt_photo_is_skipped(sample_faces, tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "images" / name).write_bytes((sample_faces / "images" / "000008.jpg").read_bytes())
    (root / "images" / "c.jpg").write_bytes(b"not a jpeg")
    (root / "labels.csv").write_text("filename,Smiling\na.jpg,1\nb.jpg,-1\nc.jpg,1\n")
    data = load_faces(root, cache_dir=tmp_path / "cache", progress=False)
    assert data.filenames == ["a.jpg", "b.jpg"] and data.attr("Smiling").tolist() == [1, 0]
    # said in one line on stderr: stdout may be a command's JSON (research.scenes gap)
    out, err = capsys.readouterr()
    assert "skipped" not in out and [ln for ln in err.splitlines() if "c.jpg" in ln][0].startswith("skipped: ")


@pytest.mark.slow
@pytest.mark.realdata
def test_celeba_layout_split_sizes(celeba_dir, tmp_path):
    data = load_faces(celeba_dir, spec=InputSpec(height=16, width=16), cache_dir=tmp_path, progress=False)
    assert len(data) == 10000
    assert [int((data.splits == s).sum()) for s in (0, 1, 2)] == [7032, 979, 1989]
    train_ids = set(data.subset("train").identities.tolist())
    assert not train_ids & set(data.subset("test").identities.tolist())
    assert 0.38 < data.attr("Male").mean() < 0.46


# --- the split every tool derives, and the labels checked before any decoding ----------

from protocol.datasets import (CELEBA_CROP_BOX, WHOLE_IMAGE, check_class_counts, default_crop_box,  # noqa: E402
                               derive_split)


def _generic(root, sample_faces, header, rows):
    """A generic-layout folder whose images/ links the bundled photos."""
    (root / "images").mkdir(parents=True)
    for f in sorted((sample_faces / "images").glob("*.jpg")):
        (root / "images" / f.name).symlink_to(f)
    (root / "labels.csv").write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return root


def _unsplit_copy(root, sample_faces, identity=True):
    """The bundled photos' labels.csv without its split column (and without identities)."""
    import csv

    rows = list(csv.DictReader((sample_faces / "labels.csv").open()))
    cols = ["filename", *(["identity"] if identity else []), "Male", "Smiling"]
    return _generic(root, sample_faces, cols, [[r[c] for c in cols] for r in rows])


def test_data_without_a_split_gets_the_same_identity_disjoint_split_every_time(sample_faces, tmp_path, capsys):
    root = _unsplit_copy(tmp_path / "ds", sample_faces)
    data = load_faces(root, cache_dir=tmp_path / "c", progress=False)  # every tool says so, progress bars or not
    line = capsys.readouterr().out.strip()
    assert line.startswith("split: train ") and "identity-disjoint" in line and "labels.csv has no split" in line
    tr, va, te = data.split_sizes()
    assert tr + va + te == 48 and tr > va and tr > te and te > 0  # 80/10/10 of 48 photos, by hash
    # identity-disjoint, and another tool reading the folder (another cache) derives the same
    ids = [set(data.identities[data.splits == s].tolist()) for s in (0, 1, 2)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    again = load_faces(root, cache_dir=tmp_path / "c2", progress=False, announce=False)
    assert np.array_equal(again.splits, data.splits) and again.filenames == data.filenames
    assert capsys.readouterr().out == ""
    # a row's split is a function of the row alone: removing photos does not move the others
    sub = derive_split(data.filenames[:10], [str(i) for i in data.identities[:10]])
    assert np.array_equal(sub, data.splits[:10])
    # the split written beside a run reads back as a split file
    path = data.write_split(tmp_path / "split.txt")
    back = load_faces(root, cache_dir=tmp_path / "c", split_file=path, progress=False)
    assert np.array_equal(back.splits, data.splits) and back.split_source == "split file split.txt"


def test_without_identities_the_split_hashes_file_names(sample_faces, tmp_path):
    root = _unsplit_copy(tmp_path / "ds", sample_faces, identity=False)
    data = load_faces(root, cache_dir=tmp_path / "c", progress=False)
    assert "file name" in data.split_source
    assert np.array_equal(data.splits, derive_split(data.filenames))
    # at scale the fractions are 80/10/10
    big = derive_split([f"{i:06d}.jpg" for i in range(20000)])
    assert np.allclose(np.bincount(big) / 20000, [0.8, 0.1, 0.1], atol=0.01)


@pytest.mark.parametrize("header, rows, message", [
    (["filename", "Male"], [["000008.jpg", 1], ["000011.jpg", 2]], r"labels.csv:3: column 'Male' has value '2'"),
    (["filename", "Age"], [["000008.jpg", 37]], r"labels.csv:2: column 'Age' has value '37'.*binary"),
    (["filename", "Male"], [["000008.jpg", -1], ["000011.jpg", 0]], r"labels.csv:3: column 'Male' mixes -1 and 0"),
    (["filename", "Male"], [["000008.jpg", 1], ["000011.jpg", 0], ["000008.jpg", 1]],
     r"labels.csv:4: duplicate file name '000008.jpg' \(first at row 2\)"),
    (["filename", "Male"], [["000008.jpg", 1], ["nobody.jpg", 0]],
     r"labels.csv: 1 labelled photo\(s\) missing from .*images, the first 'nobody.jpg' \(row 3\)"),
    (["filename", "split", "Male"], [["000008.jpg", 0, 1], ["000011.jpg", 3, 0]],
     r"labels.csv:3: column 'split' has value '3'"),
    (["filename", "split", "Male"], [["000008.jpg", 0, 1], ["000011.jpg", "", 0]],
     r"labels.csv:3: column 'split' has value ''"),
])
def test_bad_labels_fail_in_one_line_before_any_photo_is_decoded(sample_faces, tmp_path, header, rows, message,
                                                                   monkeypatch):
    from protocol import datasets

    root = _generic(tmp_path / "ds", sample_faces, header, rows)
    decoded = []
    monkeypatch.setattr(datasets, "_prepare_all", lambda *a, **k: decoded.append(a) or (_ for _ in ()).throw(
        AssertionError("decoded")))
    with pytest.raises(InvalidInputError, match=message) as exc:
        load_faces(root, cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(exc.value) and not decoded


def test_split_names_and_a_split_file_with_bad_lines(sample_faces, tmp_path):
    root = _generic(tmp_path / "ds", sample_faces, ["filename", "split", "Male"],
                    [["000008.jpg", "train", 1], ["000011.jpg", "val", 0], ["000026.jpg", "test", 1]])
    assert load_faces(root, cache_dir=tmp_path / "c", progress=False).splits.tolist() == [0, 1, 2]
    bad = tmp_path / "split.txt"
    bad.write_text("000008.jpg 0\n000011.jpg 5\n")
    with pytest.raises(InvalidInputError, match=r"split.txt:2: expected 'filename split'"):
        load_faces(root, cache_dir=tmp_path / "c", split_file=bad, progress=False)
    with pytest.raises(InvalidInputError, match="split file not found"):
        load_faces(root, cache_dir=tmp_path / "c", split_file=tmp_path / "none.txt", progress=False)


def test_too_few_photos_of_a_class_in_a_split_names_attribute_class_and_split(sample_faces, tmp_path):
    data = load_faces(sample_faces, cache_dir=tmp_path, progress=False)
    check_class_counts(data, ["Male", "Smiling"], "train", 5)  # 15/17 and 13/19 on train
    with pytest.raises(InvalidInputError, match=r"attribute 'Smiling' has 0 photo\(s\) of class 1 in the val split"):
        check_class_counts(data, ["Male", "Smiling"], "val", 1)


def test_default_crop_box_per_layout(sample_faces, tmp_path):
    from protocol.datasets import parse_crop_box

    celeba = tmp_path / "celeba"
    celeba.mkdir()
    (celeba / "list_attr_celeba.txt").write_text("0\nMale\n")
    assert default_crop_box(celeba) == CELEBA_CROP_BOX
    root = _unsplit_copy(tmp_path / "ds", sample_faces)
    assert default_crop_box(root) == WHOLE_IMAGE  # a generic folder's photos are taken whole
    (root / "dataset.json").write_text('{"crop_box": [0.1, 0.2, 0.9, 0.8]}')
    assert default_crop_box(root) == (0.1, 0.2, 0.9, 0.8)
    (root / "dataset.json").write_text('{"crop_box": [0.5, 0.2, 0.4, 0.8]}')
    with pytest.raises(InvalidInputError, match="dataset.json"):
        default_crop_box(root)
    assert parse_crop_box("0,0.1,1,0.9") == (0.0, 0.1, 1.0, 0.9)
    with pytest.raises(InvalidInputError, match="--crop-box: expected 4 numbers"):
        parse_crop_box("0,0,1")
