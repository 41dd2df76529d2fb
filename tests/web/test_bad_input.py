"""What the page refuses, one clear message each: an attestation that does not verify, one
signed by a key the page does not trust, a collector without onnxruntime-web; and the
resize port against Pillow on shapes celeba does not have (both pass orders)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collector.app import create_app
from collector.web import CSP
from protocol import routes
from protocol.attestation import build_statement, generate_key, load_private_key, save_envelope, sign
from protocol.model_card import load_card

from .conftest import screenshot

ROOT = Path(__file__).resolve().parents[2]


def models_copy(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "exported_models" / "pric-male", models / "pric-male")
    shutil.copytree(ROOT / "exported_models" / "trusted-auditors", models / "trusted-auditors")
    return models


def refused(page, lv) -> str:
    page.goto(lv.url + "/app/")
    page.click("#join-btn")
    page.wait_for_selector("#alert:not([hidden])")
    assert page.is_hidden("#photos") and page.is_hidden("#agree-btn")
    return page.text_content("#alert")


@pytest.mark.browser
@pytest.mark.slow
def test_tampered_attestation_is_refused(live, page_of, tmp_path):
    models = models_copy(tmp_path)
    env_path = next((models / "pric-male" / "attestations").glob("*.json"))
    env = json.loads(env_path.read_text())
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[5] ^= 1
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    env_path.write_text(json.dumps(env))
    # a collector that publishes it anyway: the page must not take its word
    lv = live(MODELS_DIR=str(models), ALLOW_UNATTESTED=True)
    page = page_of(lv)
    msg = refused(page, lv)
    assert msg == ("The model cannot be used: model pric-male@6: no valid attestation: attestation signed by "
                   "PRIC project release key: the signature does not verify (tampered or forged)")
    screenshot(page, "attestation-refused")
    assert not [r for r in lv.requests if r["url"].endswith(routes.ITEMS)]


@pytest.mark.browser
@pytest.mark.slow
def test_attestation_by_a_key_the_page_does_not_trust(live, page_of, tmp_path):
    models = models_copy(tmp_path)
    model_dir = models / "pric-male"
    old = json.loads(base64.b64decode(json.loads(next((model_dir / "attestations").glob("*.json")).read_text())["payload"]))
    shutil.rmtree(model_dir / "attestations")
    key = generate_key(tmp_path / "k.pem", models / "trusted-auditors" / "other.json", "Some other auditor")
    pred = old["predicate"]
    statement = build_statement(load_card(model_dir), model_dir, measured=pred["measured"], thresholds=pred["thresholds"],
                                data=pred["data"], auditor=key)
    save_envelope(model_dir, sign(statement, load_private_key(tmp_path / "k.pem")))
    lv = live(MODELS_DIR=str(models))  # the collector trusts that key; the page does not
    msg = refused(page_of(lv), lv)
    assert "signed only by keys this page does not trust" in msg and key.keyid[:16] in msg


def test_page_off_without_onnxruntime_web(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(ROOT / "exported_models"),
                      "WEB_ORT_DIR": str(tmp_path / "nothing-here")})
    c = app.test_client()
    for path in (routes.WEB_APP, routes.WEB_ORT.replace("<name>", "ort.wasm.min.mjs")):
        resp = c.get(path)
        assert resp.status_code == 503
        assert resp.get_data(as_text=True).count("\n") == 1 and "make setup" in resp.get_data(as_text=True)
    assert c.get(routes.WEB_ORT.replace("<name>", "../package.json")).status_code == 404
    assert c.get("/app/static/../web.py").status_code == 404
    assert c.get(routes.HEALTH).status_code == 200  # the API is unaffected


def test_page_headers_and_generated_routes(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(ROOT / "exported_models")})
    c = app.test_client()
    resp = c.get(routes.WEB_ROUTES_JS)
    assert resp.status_code == 200 and resp.headers["Content-Security-Policy"] == CSP
    text = resp.get_data(as_text=True)
    for name in ("ITEMS", "REGISTER", "ME", "MODEL_ATTESTATIONS", "ENROLMENT_HEADER"):
        assert f"export const {name} = {json.dumps(getattr(routes, name))};" in text
    # only this origin: no other host anywhere in the policy
    assert "http" not in CSP and "*" not in CSP and "default-src 'none'" in CSP and "connect-src 'self'" in CSP


def test_page_face_constants_are_the_protocol_ones(tmp_path):
    """faces.js ports protocol.align and protocol.faces: their constants reach it in routes.js,
    made from the Python ones, and the page declares no copy of its own."""
    import re

    from protocol import align, faces

    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(ROOT / "exported_models")})
    text = app.test_client().get(routes.WEB_ROUTES_JS).get_data(as_text=True)
    names = {"DETECT_SIDE": align, "DETECT_DRAFT_MIN": align, "CUT_MARGIN": align, "MIN_EYE_PX": align,
             "MAX_ANGLE": align, "MAX_RESIDUAL": align, "MAX_CANDIDATES": faces, "NESTED_FACE": faces}
    for name, module in names.items():
        assert f"export const {name} = {json.dumps(getattr(module, name))};" in text, name
    page = (ROOT / "collector" / "webapp" / "js" / "faces.js").read_text()
    imported = re.search(r"import \{([^}]*)\} from './routes.js';", page)
    assert imported and set(names) <= {n.strip() for n in imported.group(1).split(",")}
    assert not re.search(rf"\b(const|let|var)\s+({'|'.join(names)})\b", page)


def test_page_policy_is_the_client_default():
    from dataclasses import asdict

    from client.verify import Policy

    text = (ROOT / "collector" / "webapp" / "js" / "trust.js").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("export const POLICY"))
    got = json.loads(line.split("=", 1)[1].strip().rstrip(";").replace("private_margin", '"private_margin"')
                     .replace("max_psnr", '"max_psnr"').replace("max_reid_rank1", '"max_reid_rank1"')
                     .replace("per_person_margin", '"per_person_margin"'))
    assert got == asdict(Policy())


RESIZE = """async (cases) => {
  const { resize } = await import('/app/static/js/resize.js');
  const out = [];
  for (const c of cases) {
    const raw = Uint8Array.from(atob(c.src), (ch) => ch.charCodeAt(0));
    const data = new Uint8Array(c.w * c.h * 4);
    for (let i = 0; i < c.w * c.h; i++) { data.set(raw.subarray(i * 3, i * 3 + 3), i * 4); data[i * 4 + 3] = 255; }
    const img = resize({ w: c.w, h: c.h, data }, c.ow, c.oh, c.filter, c.box);
    const rgb = new Uint8Array(c.ow * c.oh * 3);
    for (let i = 0; i < c.ow * c.oh; i++) rgb.set(img.data.subarray(i * 4, i * 4 + 3), i * 3);
    let s = ''; for (const b of rgb) s += String.fromCharCode(b);
    out.push(btoa(s));
  }
  return out;
}"""


@pytest.mark.browser
@pytest.mark.slow
def test_resize_port_equals_pillow_on_any_shape(live, page_of):
    """Random sizes, boxes, up- and downscaling, both of Pillow 13's pass orders."""
    rng = np.random.default_rng(3)
    cases, want = [], []
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}
    while len(cases) < 120:
        w, h, ow, oh = (int(v) for v in rng.integers(2, 300, 4))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))]
        if box[2] - box[0] == ow and box[3] - box[1] == oh:
            continue
        name = list(filters)[len(cases) % 3]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want.append(np.asarray(Image.fromarray(arr).resize((ow, oh), filters[name], box=tuple(box))))
        cases.append({"w": w, "h": h, "ow": ow, "oh": oh, "box": box, "filter": name,
                      "src": base64.b64encode(arr.tobytes()).decode()})
    vertical_first = sum(1 for c in cases if c["h"] - c["oh"] > 0 and c["h"] - c["oh"] > 2 * (c["w"] - c["ow"]))
    assert 20 < vertical_first < 100  # both orders are exercised
    lv = live()
    page = page_of(lv)
    page.goto(lv.url + "/app/")
    got = page.evaluate(RESIZE, cases)
    for c, w, g in zip(cases, want, got):
        assert np.array_equal(np.frombuffer(base64.b64decode(g), np.uint8).reshape(w.shape), w), c["box"]
