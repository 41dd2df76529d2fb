"""The same item ids in the page as in pric-client: `pric-client page-key` writes the
registration and its item-id secret, the page imports it, and a photo uploaded from both
gets one id and is stored once. A file for another collector is refused before its token
is sent anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from client.cli import PAGE_KEY_FORMAT
from client.cli import main as client_main
from client.pipeline import item_id_for
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import decode_batch_binary

from .test_flow import items_of, photos, wait_flag

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "exported_models" / "pric-male-decision"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def client(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = client_main(list(argv), out=out, err=err)
    return rc, out.getvalue() + err.getvalue()


def test_page_uses_pric_clients_item_ids(live, page_of, tmp_path):
    lv = live()
    home = tmp_path / "home"
    good = photos(tmp_path, 6)
    assert client("--home", str(home), "register", "--server", lv.url)[0] == 0
    rc, said = client("--home", str(home), "upload", "--yes", *[str(p) for p in good[:4]])
    assert rc == 0, said
    token = json.loads((home / "config.json").read_text())["token"]
    assert items_of(lv, token) == 4

    key_file = tmp_path / "my-page-key.json"
    rc, said = client("--home", str(home), "page-key", "--out", str(key_file))
    assert rc == 0 and "mode 0600" in said, said
    assert os.stat(key_file).st_mode & 0o077 == 0
    doc = json.loads(key_file.read_text())
    assert doc["format"] == PAGE_KEY_FORMAT and doc["token"] == token
    item_key = bytes.fromhex((home / "item-key").read_text().strip())
    assert bytes.fromhex(doc["item_key"]) == item_key
    # an existing file is not replaced without --force
    assert client("--home", str(home), "page-key", "--out", str(key_file))[0] == 2

    page = page_of(lv)
    page.goto(lv.url + "/app/")
    page.wait_for_selector("#join:not([hidden])")
    # a file for another collector: refused before the token goes anywhere
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "server": "https://collector.example"}))
    page.set_input_files("#keyfile", str(other))
    wait_flag(page, "imported")
    assert "not at this collector" in page.text_content("#alert") and page.is_visible("#join")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    page.set_input_files("#keyfile", str(broken))
    wait_flag(page, "imported")
    assert "not a pric-client page key: not JSON" in page.text_content("#alert")
    assert not [r for r in lv.requests if doc["token"] in json.dumps(r["headers"])]

    page.set_input_files("#keyfile", str(key_file))
    wait_flag(page, "imported")
    page.wait_for_selector("#agree-btn:not([hidden])")
    assert f"participant {doc['participant_id']}" in page.text_content("#who")
    page.click("#agree-btn")
    page.wait_for_selector("#photos:not([hidden])")
    page.set_input_files("#files", [str(p) for p in good])
    wait_flag(page, "ready")
    assert "6 to send" in page.text_content("#photo-state")
    page.click("#upload-btn")
    wait_flag(page, "uploaded")
    # the 4 pric-client sent are the same items: the collector holds them once
    assert "2 new, 4 the collector already had" in page.text_content("#alert"), page.text_content("#alert")
    assert items_of(lv, token) == 6

    card = load_card(MODEL_DIR)
    want = {item_id_for(item_key, hashlib.sha256(p.read_bytes()).hexdigest(), card.sha256) for p in good}
    sent = [item.item_id for r in lv.requests if r["method"] == "POST" and r["url"] == lv.url + routes.ITEMS
            for item in decode_batch_binary(r["body"]).items]
    assert sorted(sent) == sorted(want)
