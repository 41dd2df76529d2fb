"""The photo formats phones and cameras produce all go through the client's transform:
JPEG with EXIF orientation, PNG with alpha, grayscale, CMYK, WebP, HEIC/HEIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.pipeline import register_heif
from protocol.model_card import load_card
from protocol.preprocess import prepare, load_image

ORIENTATION = 0x0112


def _write_formats(folder: Path, face: Image.Image) -> list[str]:
    """Save `face` in each format; returns the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    face.save(folder / "upright.jpg", quality=95)
    # stored turned a quarter, with the tag that turns it back upright on display
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    face.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.new("L", face.size, 200))
    rgba.save(folder / "alpha.png")
    face.convert("L").save(folder / "gray.png")
    face.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    face.save(folder / "photo.webp", quality=90)
    names = ["upright.jpg", "exif_rotated.jpg", "alpha.png", "gray.png", "cmyk.jpg", "photo.webp"]
    try:
        register_heif()
        face.save(folder / "photo.heic", format="HEIF", quality=90)
        names.append("photo.heic")
    except (KeyError, OSError, ValueError) as exc:
        (folder / "photo.heic").unlink(missing_ok=True)
        pytest.skip(f"pillow-heif cannot encode HEIF here ({exc})")
    return names


def test_every_phone_format_is_transformed(cli, tmp_path: Path, sample_images: list[Path], features_model_dir: Path) -> None:
    face = Image.open(sample_images[0]).convert("RGB")
    names = _write_formats(tmp_path / "photos", face)
    out = tmp_path / "f.npz"

    res = cli("--home", str(tmp_path / "h"), "transform", str(tmp_path / "photos"), "--out", str(out),
              "--model-dir", str(features_model_dir))

    assert res.rc == 0, res.err
    assert res.err.strip() == ""
    with np.load(out, allow_pickle=False) as z:
        got = sorted(Path(n).name for n in z["file_names"])
        feats = dict(zip((Path(n).name for n in z["file_names"]), z["features"]))
    assert got == sorted(names)
    # EXIF orientation applied: the tagged file matches the upright one, not its raw pixels
    same = np.abs(feats["exif_rotated.jpg"] - feats["upright.jpg"]).mean()
    assert same < 0.02 * np.abs(feats["upright.jpg"]).mean() + 1e-3


def test_exif_orientation_and_alpha_pixels(tmp_path: Path, sample_images: list[Path], features_model_dir: Path) -> None:
    spec = load_card(features_model_dir).input
    face = Image.open(sample_images[1]).convert("RGB")
    _write_formats(tmp_path, face)
    upright = prepare(load_image(tmp_path / "upright.jpg", spec), spec).astype(np.float32)
    rotated = prepare(load_image(tmp_path / "exif_rotated.jpg", spec), spec).astype(np.float32)
    raw = Image.open(tmp_path / "exif_rotated.jpg").convert("RGB").resize((spec.width, spec.height))
    assert np.abs(rotated - upright).mean() < 3.0
    assert np.abs(np.asarray(raw, np.float32) - upright).mean() > 3 * np.abs(rotated - upright).mean()
    alpha = prepare(load_image(tmp_path / "alpha.png", spec), spec).astype(np.float32)
    # 200/255 opacity over white: brighter than the opaque photo, never darker
    assert alpha.mean() > upright.mean()
