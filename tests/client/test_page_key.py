"""pric-client page-key: the registration and its item-id secret for the participant's page
(the page's side is tested in tests/web/test_item_key.py)."""

from __future__ import annotations

import json
import os

from client.cli import PAGE_KEY_FORMAT


def test_page_key_writes_registration_and_item_key(registered_home, cli, tmp_path):
    out = tmp_path / "k.json"
    res = cli("--home", str(registered_home), "page-key", "--out", str(out))
    assert res.rc == 0, res.err
    assert os.stat(out).st_mode & 0o777 == 0o600
    doc = json.loads(out.read_text())
    config = json.loads((registered_home / "config.json").read_text())
    assert doc == {"format": PAGE_KEY_FORMAT, "server": config["server"], "participant_id": config["participant_id"],
                   "token": config["token"], "item_key": (registered_home / "item-key").read_text().strip()}
    assert config["token"] not in res.out + res.err  # the secret goes to the file only
    again = cli("--home", str(registered_home), "page-key", "--out", str(out))
    assert again.rc == 2 and "already exists" in again.err
    assert cli("--home", str(registered_home), "page-key", "--out", str(out), "--force").rc == 0


def test_page_key_needs_a_registration(home, cli, tmp_path):
    res = cli("--home", str(home), "page-key", "--out", str(tmp_path / "k.json"))
    assert res.rc == 2 and not (tmp_path / "k.json").exists()
