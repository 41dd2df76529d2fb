"""Photo formats the page decodes as Pillow does: baseline, progressive and 4:4:4 JPEGs, an
EXIF-rotated and EXIF-mirrored JPEGs, a greyscale JPEG, RGB, palette and transparent PNGs
(composited over white in both): their model inputs equal the Python client's byte for byte."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.pipeline import Extractor
from protocol.model_card import load_card

from .conftest import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGE = """async ([token]) => {
  const api = await import('/app/static/js/api.js');
  const { modelInputs } = await import('/app/static/js/photos.js');
  const card = await api.call('/api/v1/model', { token });
  const out = {};
  for (const f of document.getElementById('fmt').files) {
    const x = (await modelInputs(new Uint8Array(await f.arrayBuffer()), card))[0];
    let s = ''; for (const b of x) s += String.fromCharCode(b);
    out[f.name] = btoa(s);
  }
  return out;
}"""


def variants(tmp: Path) -> tuple[list[Path], list[Path]]:
    """(opaque variants, a transparent PNG) of a smooth 89x109 photo."""
    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 256, (7, 6, 3), dtype=np.uint8)).resize((89, 109), Image.Resampling.BICUBIC)
    exact = []

    def save(name: str, img: Image.Image, **kw) -> None:
        path = tmp / name
        img.save(path, **kw)
        exact.append(path)

    save("baseline.jpg", base, quality=90)
    save("progressive.jpg", base, quality=90, progressive=True)
    save("444.jpg", base, quality=95, subsampling=0)
    save("grey.jpg", base.convert("L"), quality=90)
    for orientation in (3, 6, 8, 2, 5):
        exif = Image.Exif()
        exif[0x0112] = orientation
        turned = base.rotate(90, expand=True) if orientation in (6, 8, 5) else base
        save(f"exif{orientation}.jpg", turned, quality=90, exif=exif.tobytes())
    save("rgb.png", base)
    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    alpha = base.convert("RGBA")
    alpha.putalpha(Image.fromarray(rng.integers(0, 256, (109, 89), dtype=np.uint8)))
    (tmp / "alpha.png").parent.mkdir(exist_ok=True)
    alpha.save(tmp / "alpha.png")
    return exact, [tmp / "alpha.png"]


def test_formats_decode_as_pillow_does(live, page_of, tmp_path):
    exact, transparent = variants(tmp_path)
    lv = live()
    token = lv.app.test_client().post("/api/v1/participants").get_json()["token"]
    page = page_of(lv)
    page.goto(lv.url + "/app/")
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'fmt'; document.body.append(i); }")
    page.set_input_files("#fmt", [str(p) for p in exact + transparent])
    got = page.evaluate(PAGE, [token])
    model_dir = ROOT / "exported_models" / "pric-male"
    ext = Extractor(load_card(model_dir), model_dir)
    for path in exact + transparent:
        ours = ext.decode(path.read_bytes(), path)
        theirs = np.frombuffer(base64.b64decode(got[path.name]), np.uint8).reshape(ours.shape)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() == 0, f"{path.name}: {int((diff > 0).sum())} values differ, at most {diff.max()}"
