"""Ambiguation of sparse codes in the page (protocol.sparse_code for the Python client):
the collector accepts the page's uploads of sparse-celeba, each stored code has exactly
k + k_fake non-zeros per map (the true support is not told apart by the collector), the
keys stay in the page and are saved as client.keystore's key file, and decoding a stored
code with the saved key gives the Python client's true code of the same photo. The page's
key format and compact wire form equal protocol.sparse_code's bytes, and its ambiguation
floor is client.verify's."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.keystore import read_key_file
from client.pipeline import Extractor, item_id_for
from collector.app import issue_token
from collector.auth import AUDITOR
from protocol import routes
from protocol.model_card import load_card
from protocol.sparse_code import (
    AmbiguatedCode, ambiguate, code_from_arrays, disambiguate, pack_ambiguated, quantise_code, released_scale,
    unpack_key)

from .conftest import ROOT, screenshot
from .test_flow import photos, wait_flag

MODEL_DIR = ROOT / "exported_models" / "sparse-celeba"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def stored_items(lv: Any, model_id: str) -> dict[str, dict[str, np.ndarray]]:
    got = lv.app.test_client().get(routes.EXPORT, query_string={"model_id": model_id, "limit": 1000},
                                   headers={"Authorization": f"Bearer {issue_token(lv.app, AUDITOR)}"}).get_json()
    return {it["item_id"]: {k: np.load(io.BytesIO(base64.b64decode(v)), allow_pickle=False)
                            for k, v in it["arrays"].items()} for it in got["items"]}


def test_the_page_ambiguates_uploads_and_keeps_the_keys(live, page_of, tmp_path):
    card = load_card(MODEL_DIR)
    sp = card.sparse
    lv = live(CURRENT_MODEL=card.model_id)
    page = page_of(lv)
    # 4 photos: sparse-celeba@5's signed linkage figures (pooled 0.825 at 4+, 0.887 at 10)
    # pass the default per-person bound 0.850 for at most 4 photos of one participant
    good = photos(tmp_path, 4)

    page.goto(lv.url + routes.WEB_APP)
    page.click("#join-btn")
    page.wait_for_selector("#agree-btn:not([hidden])")
    summary = page.text_content("#summary")
    assert f"Model {card.model_id}" in summary and f"{sp.k} true and {sp.k_fake} fake values" in summary
    page.click("#agree-btn")
    page.wait_for_selector("#photos:not([hidden])")
    item_key = bytes(page.evaluate("() => Array.from(window.pric.me.item_key)"))
    page.set_input_files("#files", [str(p) for p in good])
    wait_flag(page, "ready")
    assert "4 to send, 0 already sent, 0 skipped" in page.text_content("#photo-state")
    # a first attempt is cut: the retry sends the very codes drawn before (their keys are kept)
    page.route("**" + routes.ITEMS, lambda route: route.abort("internetdisconnected"))
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    page.unroute("**" + routes.ITEMS)
    page.reload()  # and a reload between: the keys are in IndexedDB, not in memory
    page.wait_for_selector("#photos:not([hidden])")
    page.set_input_files("#files", [str(p) for p in good])
    wait_flag(page, "ready")
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    assert "Uploaded 4" in page.text_content("#alert"), page.text_content("#alert")
    page.wait_for_function("() => document.getElementById('keys-text').textContent.includes('keys of 4 ')")
    screenshot(page, "sparse-keys")
    with page.expect_download() as dl:
        page.click("#keys-btn")
    key_path = tmp_path / "keys.json"
    dl.value.save_as(key_path)
    keys = read_key_file(key_path)  # client.keystore's format, as `pric-client decode` reads it
    assert json.loads(key_path.read_text())["keys"][next(iter(keys))]["model_id"] == card.model_id

    # no key, no file name, no pixels left the page; the cut attempt and the retry sent the same codes
    sent: dict[str, list[bytes]] = {}
    from protocol.wire import decode_batch_binary
    for r in lv.requests:
        body = r["body"] or b""
        if r["method"] == "POST" and r["url"] == lv.url + routes.ITEMS:
            for item in decode_batch_binary(body).items:
                assert set(item.arrays) == {"indices", "values"} and item.labels == {}
                sent.setdefault(item.item_id, []).append(item.arrays["values"].tobytes() + item.arrays["indices"].tobytes())
        for key in keys.values():
            assert key[17:] not in body
    assert len(sent) == 4 and all(len(v) == 2 and v[0] == v[1] for v in sent.values())

    stored = stored_items(lv, card.model_id)
    ext = Extractor(card, MODEL_DIR)
    assert set(stored) == set(keys) and len(stored) == 4
    for p in good:
        data = p.read_bytes()
        item_id = item_id_for(item_key, hashlib.sha256(data).hexdigest(), card.sha256)
        code = code_from_arrays(stored[item_id], sp)  # the collector's own checks
        # the collector holds k' entries per map, all non-zero: which k are true is not in them
        dense = code.to_dense(sp.m)
        assert code.indices.shape == (sp.L, sp.k_prime) and ((dense != 0).sum(axis=1) == sp.k_prime).all()
        mask, k, _ = unpack_key(keys[item_id])
        assert k == sp.k and (mask.sum(axis=1) == sp.k).all()
        # the key decodes the Python client's true code of this photo, on the released grid
        true = disambiguate(code, keys[item_id], sp.m)
        py = ext.transform(ext.decode(data, p)[None])[0]
        # (the released values are float16: so is the grid value the Python client would send)
        want = quantise_code(py, sp.k, sp.value_bits, scale=released_scale(code)).astype(np.float16).astype(np.float32)
        assert ((true != 0) == (want != 0)).all(), "the true support differs from the Python client's"
        nz = want != 0
        step = released_scale(code) * (1 - (1 - 1 / 2 ** (sp.value_bits - 1)) ** 1.5)  # the grid's coarsest step
        # equal grid values, but for a feature within float tolerance of a level's boundary
        assert (true[nz] == want[nz]).mean() >= 0.99 and np.abs(true - want).max() <= step
        # and the fakes are not told apart by magnitude: the k largest released are not the true ones
        top = np.argsort(-np.abs(code.values.astype(np.float32)), axis=1)[:, :sp.k]
        assert np.take_along_axis(mask, top, axis=1).mean() < 0.5


def test_the_page_key_and_compact_code_are_the_protocols_bytes(live, page_of):
    """The page's packKey / packAmbiguated / fingerprint on a code the Python side ambiguated:
    the same bytes; and the page's floor refuses a card with too few fakes."""
    card = load_card(MODEL_DIR)
    from dataclasses import replace
    sp = replace(card.sparse, wire="compact")
    rng = np.random.default_rng(3)
    dense = (rng.normal(size=(sp.L, sp.m)) * (rng.random((sp.L, sp.m)) < 0.2)).astype(np.float32)
    amb, key = ambiguate(dense, sp, rng)
    mask = unpack_key(key)[0]
    lv = live()
    page = page_of(lv)
    page.goto(lv.url + routes.WEB_APP)
    got = page.evaluate("""async ([L, m, k, kFake, vb, idx, vals, mask]) => {
      const s = await import('./static/js/sparse.js');
      const spec = s.sparseSpec({model_id: 't@1', sparse: {L, m, k, k_fake: kFake, value_bits: vb, wire: 'compact'},
                                 output: {shape: [L, m], dtype: 'float32'}});
      const indices = Uint16Array.from(idx), values = Float16Array.from(vals);
      const fp = await s.fingerprint(indices, values);
      const key = s.packKey(Uint8Array.from(mask), L, k + kFake, k, fp);
      const code = s.codeArrays({indices, values}, spec).code;
      const refuse = (kf) => { try { s.sparseSpec({model_id: 't@1', sparse: {L, m, k, k_fake: kf}, output: {shape: [L, m], dtype: 'float32'}}); return ''; } catch (e) { return e.message; } };
      return {key: Array.from(key), code: Array.from(code), wire: s.wireArrays(spec),
              low: refuse(2 * k - 1), ok: refuse(2 * k)};
    }""", [sp.L, sp.m, sp.k, sp.k_fake, sp.value_bits, amb.indices.ravel().tolist(),
           amb.values.astype(np.float32).ravel().tolist(), mask.ravel().astype(int).tolist()])
    assert bytes(got["key"]) == key
    assert bytes(got["code"]) == pack_ambiguated(amb, sp)
    assert got["wire"] == [{"name": "code", "dtype": "uint8", "shape": [len(pack_ambiguated(amb, sp))]}]
    assert f"never adds fewer than max(2·k, 16) = {2 * sp.k}" in got["low"] and got["ok"] == ""
    # and the compact bytes decode to the code (the collector's reading)
    back = code_from_arrays({"code": np.frombuffer(bytes(got["code"]), np.uint8)}, sp)
    assert (back.indices == amb.indices).all() and (back.values == amb.values).all()
    assert isinstance(back, AmbiguatedCode) and Path(MODEL_DIR).is_dir()


def test_the_pages_fakes_are_not_told_apart_by_magnitude_and_decoy_cards_are_refused(live, page_of):
    """protocol.sparse_code.sample_fake_values' property, on the page's draws: keeping the
    k largest (or smallest) released magnitudes recovers the true support only at chance
    k/k'; each page code decodes with its key to the top-k of its input."""
    sp = load_card(MODEL_DIR).sparse
    rng = np.random.default_rng(5)
    n = 60
    codes = rng.laplace(size=(n, sp.L, sp.m)).astype(np.float32)
    lv = live()
    page = page_of(lv)
    page.goto(lv.url + routes.WEB_APP)
    got = page.evaluate("""async ([L, m, k, kFake, vb, flat, n]) => {
      const s = await import('./static/js/sparse.js');
      const card = {model_id: 't@1', sparse: {L, m, k, k_fake: kFake, value_bits: vb}, output: {shape: [L, m], dtype: 'float32'}};
      const spec = s.sparseSpec(card), data = Float32Array.from(flat), out = [];
      for (let i = 0; i < n; i++) {
        const c = await s.ambiguate(data.subarray(i * L * m, (i + 1) * L * m), spec);
        out.push({idx: Array.from(c.indices), vals: Array.from(c.values), key: Array.from(c.key)});
      }
      let decoy = '';
      try { s.sparseSpec({...card, sparse: {...card.sparse, decoys: 'decoys.npz'}}); } catch (e) { decoy = e.message; }
      let decoyCodes = '';  // one decoy code per true code: below this page's floor, refused for its decoys
      try { s.sparseSpec({...card, sparse: {...card.sparse, k_fake: k, decoys: 'decoys.npz', magnitudes: 'key'}}); }
      catch (e) { decoyCodes = e.message; }
      return {out, decoy, decoyCodes};
    }""", [sp.L, sp.m, sp.k, sp.k_fake, sp.value_bits, codes.ravel().tolist(), n])
    assert "decoy bank or decoy codes" in got["decoy"] and "pric-client" in got["decoy"]
    assert "decoy bank or decoy codes" in got["decoyCodes"] and "k_fake" not in got["decoyCodes"]
    largest, smallest = [], []
    for dense, c in zip(codes, got["out"]):
        amb = AmbiguatedCode(indices=np.array(c["idx"], np.uint16).reshape(sp.L, sp.k_prime),
                             values=np.array(c["vals"], np.float16).reshape(sp.L, sp.k_prime))
        key = bytes(c["key"])
        true = disambiguate(amb, key, sp.m)
        want = quantise_code(dense, sp.k, sp.value_bits, scale=released_scale(amb)).astype(np.float16).astype(np.float32)
        assert (true == want).all()  # the page's grid, support and key, exactly the protocol's
        mask = unpack_key(key)[0]
        order = np.argsort(np.abs(amb.values.astype(np.float32)), axis=1, kind="stable")
        largest.append(np.take_along_axis(mask, order[:, -sp.k:], axis=1).mean())
        smallest.append(np.take_along_axis(mask, order[:, :sp.k], axis=1).mean())
    chance = sp.k / sp.k_prime
    assert abs(np.mean(largest) - chance) < 0.03 and abs(np.mean(smallest) - chance) < 0.03, \
        (np.mean(largest), np.mean(smallest), chance)
