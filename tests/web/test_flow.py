"""The whole participant flow in the page against a live collector on loopback: join with an
invite, verify the model, consent, transform and upload, a lost connection, a reload that
resumes without duplicates, status, withdraw. Every request the page made is then checked:
same origin only, and upload bodies that hold only the protocol's fields and the model's
outputs (the Python client's, for the same photos)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from client.pipeline import Extractor, item_id_for
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import decode_batch_binary

from .conftest import screenshot

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "exported_models" / "pric-male-decision"
SECRET = "enrol-" + "x" * 20
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def photos(tmp_path: Path, n: int) -> list[Path]:
    """n drawn faces (no real person's photo lands in the docs' screenshots), 89x109 JPEGs
    like celeba-10k's, each with an EXIF block whose bytes must never leave the page."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        bg, skin, hair = (tuple(int(v) for v in rng.integers(lo, hi, 3)) for lo, hi in ((150, 255), (120, 240), (10, 120)))
        img = Image.new("RGB", (89, 109), bg)
        d = ImageDraw.Draw(img)
        d.ellipse((14, 8, 75, 40), fill=hair)
        d.ellipse((18, 18, 71, 96), fill=skin)
        eye = int(rng.integers(40, 50))
        for x in (32, 57):
            d.ellipse((x - 4, eye - 3, x + 4, eye + 3), fill=(255, 255, 255))
            d.ellipse((x - 2, eye - 2, x + 2, eye + 2), fill=(30, 30, 60))
        smile = int(rng.integers(-6, 8))
        d.arc((32, 66 - abs(smile), 57, 78 + smile), 0 if smile >= 0 else 180, 180 if smile >= 0 else 360,
              fill=(150, 40, 50), width=3)
        exif = Image.Exif()
        exif[0x010E] = f"secret-exif-description-{i}"  # ImageDescription
        path = tmp_path / f"holiday-{i:03d}.jpg"
        img.save(path, "JPEG", quality=92, exif=exif.tobytes())
        out.append(path)
    return out


def bad_files(tmp_path: Path, good: Path) -> dict[Path, str]:
    """Bad inputs → the words of the page's one-line message about each."""
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo at all\n")
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    # a PNG whose header claims 20000x20000 pixels: refused before decoding
    huge = tmp_path / "panorama.png"
    ihdr = b"IHDR" + (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big"))
    return {notes: "not a recognised image format", heic: "use the Python client", cut: "cannot decode image",
            huge: "20000x20000 pixels exceeds the limit"}


def wait_flag(page: Any, flag: str) -> None:
    page.wait_for_function(f"() => document.body.dataset.{flag}")
    page.evaluate(f"() => {{ delete document.body.dataset.{flag}; }}")


def items_of(lv: Any, token: str) -> int:
    resp = lv.app.test_client().get(routes.ME, headers={"Authorization": f"Bearer {token}"})
    return resp.get_json()["items"] if resp.status_code == 200 else -resp.status_code


def test_participant_flow_and_what_leaves_the_page(live, page_of, tmp_path):
    lv = live(REGISTRATION="invite", ENROLMENT_SECRET=SECRET)
    page = page_of(lv)
    good = photos(tmp_path, 30)
    bad = bad_files(tmp_path, good[0])

    page.goto(lv.url + "/app/")
    page.wait_for_selector("#join:not([hidden])")
    screenshot(page, "join")
    page.fill("#invite", "not-an-invite")
    page.click("#join-btn")
    page.wait_for_selector("#alert:not([hidden])")
    assert "401" in page.text_content("#alert") and "invite" in page.text_content("#alert")
    page.fill("#invite", SECRET)
    page.click("#join-btn")
    page.wait_for_selector("#agree-btn:not([hidden])")
    summary = page.text_content("#summary")
    assert "Model pric-male-decision@2" in summary and "Audited by PRIC project release key" in summary and "hides: Male" in summary
    assert page.is_hidden("#photos")  # nothing can be picked before consent
    screenshot(page, "consent")
    page.click("#agree-btn")
    page.wait_for_selector("#photos:not([hidden])")
    me = page.evaluate("() => ({token: window.pric.me.token, key: Array.from(window.pric.me.item_key)})")
    token, item_key = me["token"], bytes(me["key"])

    # 20 good photos, one of them twice under another name, and the bad ones: each bad one
    # named with one line, the rest go on, the copy is sent once
    copy = tmp_path / "copy-of-holiday.jpg"
    copy.write_bytes(good[0].read_bytes())
    page.set_input_files("#files", [str(p) for p in good[:20]] + [str(copy)] + [str(p) for p in bad])
    wait_flag(page, "ready")
    problems = page.locator("#problems li").all_text_contents()
    assert len(problems) == len(bad)
    for path, words in bad.items():
        assert any(line.startswith(path.name + ":") and words in line for line in problems), (path.name, problems)
    assert "20 to send, 1 already sent, 4 skipped" in page.text_content("#photo-state")
    screenshot(page, "photos")
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    assert "Uploaded 20" in page.text_content("#alert")
    assert items_of(lv, token) == 20

    # a reload: consent and journal are remembered; the 20 are not sent again
    page.reload()
    page.wait_for_selector("#photos:not([hidden])")
    page.set_input_files("#files", [str(p) for p in good])
    wait_flag(page, "ready")
    assert "10 to send, 20 already sent, 0 skipped" in page.text_content("#photo-state")
    # the connection drops during the upload: one message, nothing lost, the retry completes
    page.route("**" + routes.ITEMS, lambda route: route.abort("internetdisconnected"))
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    assert "cannot reach the collector" in page.text_content("#alert") and "10 photos wait" in page.text_content("#alert")
    screenshot(page, "offline")
    page.unroute("**" + routes.ITEMS)
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    assert "Uploaded 10" in page.text_content("#alert") and "0 the collector already had" in page.text_content("#alert")
    assert items_of(lv, token) == 30
    page.click("#refresh-btn")
    page.wait_for_function("() => document.getElementById('status-text').textContent.includes('30 item(s)')")
    screenshot(page, "status")

    page.once("dialog", lambda d: d.accept())
    page.click("#withdraw-btn")
    page.wait_for_selector("#join:not([hidden])")
    assert "deleted 30 item(s)" in page.text_content("#alert")
    assert items_of(lv, token) == -401  # the token is revoked
    screenshot(page, "withdrawn")

    # what left the page: this origin only; uploads hold the protocol's fields and the
    # model's outputs of the good photos, equal to the Python client's
    card = load_card(MODEL_DIR)
    ext = Extractor(card, MODEL_DIR)
    expected = {}
    for p in good:
        data = p.read_bytes()
        expected[item_id_for(item_key, hashlib.sha256(data).hexdigest(), card.sha256)] = \
            ext.transform(ext.decode(data, p)[None])[0]
    uploads = [r for r in lv.requests if r["url"].startswith(lv.url + routes.ITEMS)]
    assert all(r["url"].startswith(lv.url + "/") for r in lv.requests), [r["url"] for r in lv.requests]
    sent: list[str] = []
    for r in lv.requests:
        body = r["body"] or b""
        for p in [*good, *bad, copy]:
            assert p.name.encode() not in body and p.stem.encode() not in body
        assert b"secret-exif" not in body and b"Exif" not in body
        if r["method"] == "POST" and r["url"] == lv.url + routes.REGISTER:
            assert body == b""
        elif r["method"] == "POST":
            assert r["url"] == lv.url + routes.ITEMS and r["headers"]["content-type"] == "application/vnd.pric.batch"
            batch = decode_batch_binary(body)  # exactly the wire format: nothing after the last array
            assert (batch.model_id, batch.model_sha256) == (card.model_id, card.sha256)
            for item in batch.items:
                assert item.labels == {} and set(item.arrays) == {"feature"}
                assert np.abs(item.arrays["feature"] - expected[item.item_id]).max() < 1e-4
                sent.append(item.item_id)
        else:
            assert r["method"] in ("GET", "DELETE") and not body
    # 20, then 10 twice (the first attempt was cut), never a photo twice once acknowledged
    assert len(uploads) == 3 and len(sent) == 40 and len(set(sent)) == 30 and set(sent) == set(expected)
