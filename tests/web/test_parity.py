"""One preprocessing, two languages: on celeba-10k's test split the page's model inputs
equal the Python client's byte for byte, its features are within 1e-4, the decision
model's decisions are all equal, and its item ids are the client's for the same key."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest

from client.pipeline import Extractor, item_id_for
from protocol.model_card import load_card

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PRIC_CELEBA", ROOT.parent / "shared" / "data" / "celeba-10k"))
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.realdata]

# In the page: the app's own modules on the files of #parity, one model per card.
PAGE_RUN = """async ([token, models]) => {
  const api = await import('/app/static/js/api.js');
  const { modelInputs, PhotoError } = await import('/app/static/js/photos.js');
  const { Model } = await import('/app/static/js/model.js');
  const { itemKey, itemId, sha256 } = await import('/app/static/js/ids.js');
  const files = Array.from(document.getElementById('parity').files);
  const b64 = (u8) => { let s = ''; for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000)); return btoa(s); };
  const key = await itemKey(new Uint8Array(32).fill(7));
  const out = { pixels: [], outputs: {}, ids: [], errors: [] };
  const inputs = [];
  const first = await api.call(`/api/v1/models/${models[0]}`, { token });
  for (const f of files) {
    const bytes = new Uint8Array(await f.arrayBuffer());
    try { inputs.push((await modelInputs(bytes, first))[0]); } catch (e) { out.errors.push(f.name + ': ' + e.message); continue; }
    out.ids.push(await itemId(key, await sha256(bytes), first.sha256));
  }
  const all = new Uint8Array(inputs.length * inputs[0].length);
  inputs.forEach((a, i) => all.set(a, i * a.length));
  out.pixels = b64(all);
  for (const id of models) {
    const card = await api.call(`/api/v1/models/${id}`, { token });
    const file = await api.modelFile(token, id, card.file);
    const m = await Model.load(card, file.data);
    const feats = [];
    for (let i = 0; i < inputs.length; i += 16) for (const y of await m.run(inputs.slice(i, i + 16))) feats.push(y);
    const flat = new Float32Array(feats.length * m.per);
    feats.forEach((y, i) => flat.set(y, i * m.per));
    out.outputs[id] = b64(new Uint8Array(flat.buffer));
  }
  return out;
}"""


def test_page_equals_python_client_on_the_test_split(live, page_of):
    if not (DATA / "list_eval_partition.txt").is_file():
        pytest.skip(f"{DATA}: celeba-10k is not there")
    names = [line.split()[0] for line in (DATA / "list_eval_partition.txt").read_text().splitlines()
             if line.split()[1:] == ["2"]]
    limit = int(os.environ.get("PRIC_WEB_PARITY_LIMIT", "0") or 0)
    paths = [DATA / "images" / n for n in names[:limit or None]]
    lv = live()
    token = lv.app.test_client().post("/api/v1/participants").get_json()["token"]
    page = page_of(lv)
    page.goto(lv.url + "/app/")
    page.evaluate("() => { const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'parity'; document.body.append(i); }")
    page.set_input_files("#parity", [str(p) for p in paths])
    models = {"pric-male@6": ROOT / "exported_models" / "pric-male",
              "pric-male-decision@2": ROOT / "exported_models" / "pric-male-decision"}
    got = page.evaluate(PAGE_RUN, [token, list(models)])
    assert got["errors"] == []
    page_pixels = np.frombuffer(base64.b64decode(got["pixels"]), np.uint8).reshape(len(paths), 64, 64, 3)

    key = bytes([7]) * 32
    for model_id, folder in models.items():
        card = load_card(folder)
        ext = Extractor(card, folder)
        data = [p.read_bytes() for p in paths]
        ours = np.stack([ext.decode(d, p) for d, p in zip(data, paths)])
        # byte for byte: decode (Chromium's libjpeg-turbo) + crop box + the resize port
        assert np.array_equal(page_pixels, ours), f"{int((page_pixels != ours).any(axis=(1, 2, 3)).sum())} photos differ"
        feats = ext.transform(ours).reshape(len(paths), -1)
        page_feats = np.frombuffer(base64.b64decode(got["outputs"][model_id]), np.float32).reshape(len(paths), -1)
        assert np.abs(page_feats - feats).max() < 1e-4
        if feats.shape[1] == 1:  # a decision model: its sign is the decision
            assert np.array_equal(page_feats[:, 0] > 0, feats[:, 0] > 0)
        import hashlib
        want_ids = [item_id_for(key, hashlib.sha256(d).hexdigest(), load_card(models["pric-male@6"]).sha256)
                    for d in data]
        assert got["ids"] == want_ids
    print(f"parity: {len(paths)} photos, max |Δfeature| "
          f"{max(np.abs(np.frombuffer(base64.b64decode(got['outputs'][m]), np.float32).reshape(len(paths), -1) - Extractor(load_card(f), f).transform(page_pixels).reshape(len(paths), -1)).max() for m, f in models.items()):.2e}")
