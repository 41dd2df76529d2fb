"""File names the OS allows but UTF-8 does not (issue 16, item 1): a name with a `\\xff`
byte or a newline is uploaded like any other photo, the journal records it byte for byte,
a rerun uploads nothing new, and every message prints such a name on one line."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from client.display import printable


def _folder_with_odd_names(tmp_path: Path, sample_images: list[Path]) -> tuple[Path, int]:
    folder = tmp_path / "photos"
    folder.mkdir()
    n = len(sample_images) - 2
    for p in sample_images[:n]:
        (folder / p.name).write_bytes(p.read_bytes())
    # not valid UTF-8: os.walk hands it over with a surrogate escape ('\udcff')
    with open(os.fsencode(folder) + b"/\xff-photo.jpg", "wb") as f:
        f.write(sample_images[n].read_bytes())
    (folder / "new\nline.jpg").write_bytes(sample_images[n + 1].read_bytes())
    # a bad photo whose name tries to look like a summary line of its own
    (folder / "zz\n0 stored, 0 already there.jpg").write_bytes(b"not a photo")
    return folder, n + 2


def test_odd_names_are_uploaded_journalled_and_resumed(cli, registered_home: Path, live_collector, tmp_path: Path,
                                                       sample_images: list[Path]) -> None:
    folder, total = _folder_with_odd_names(tmp_path, sample_images)
    home = str(registered_home)

    first = cli("--home", home, "upload", "--yes", str(folder), "--batch-size", "16", "--workers", "1")
    assert first.rc == 0, first.err
    assert first.out.strip().splitlines()[-1] == f"{total} stored, 0 already there, 1 skipped (errors)"
    err_lines = [line for line in first.err.splitlines() if line.strip()]
    assert len(err_lines) == 1, first.err
    assert "zz\\n0 stored, 0 already there.jpg" in err_lines[0] and "skipped" in err_lines[0]

    with sqlite3.connect(registered_home / "journal.sqlite") as db:
        paths = {bytes(p) if isinstance(p, bytes) else os.fsencode(p) for (p,) in db.execute("SELECT path FROM uploads")}
    assert len(paths) == total
    assert os.fsencode(folder) + b"/\xff-photo.jpg" in paths
    assert os.fsencode(folder) + b"/new\nline.jpg" in paths

    second = cli("--home", home, "upload", "--yes", str(folder), "--batch-size", "16", "--workers", "2")
    assert second.rc == 0, second.err
    assert second.out.strip().splitlines()[-1] == f"0 stored, {total} already there, 1 skipped (errors)"


def test_transform_messages_name_odd_files_on_one_line(cli, tmp_path: Path, features_model_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/bad\xff\nname.jpg", "wb") as f:
        f.write(b"not a photo")
    out = tmp_path / "out\x1b[2J.npz"
    res = cli("transform", str(folder), "--out", str(out), "--model-dir", str(features_model_dir))
    assert res.rc == 10
    err_lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "bad\\xff\\nname.jpg" in err_lines[0]
    missing = cli("transform", str(tmp_path / "no\nsuch"), "--out", str(out), "--model-dir", str(features_model_dir))
    assert missing.rc == 10
    assert len([line for line in missing.err.splitlines() if line.strip()]) == 1
    assert "no\\nsuch" in missing.err and "\x1b" not in missing.out + missing.err


def test_printable_escapes_controls_and_undecodable_bytes_only() -> None:
    assert printable("plain name.jpg") == "plain name.jpg"
    assert printable("café 😀 日本.jpg") == "café 😀 日本.jpg"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable(os.fsdecode(b"x\xff.jpg")) == "x\\xff.jpg"
    assert printable("\x1b[31mred\x7f") == "\\x1b[31mred\\x7f"
    # line separators and bidi overrides (a name that reads backwards) are escaped too
    assert printable("a\u2028b\u202egpj.exe") == "a\\u2028b\\u202egpj.exe"
    assert printable("back\\slash") == "back\\slash"


def test_journal_keeps_path_bytes_and_reads_journals_written_before(tmp_path: Path) -> None:
    from client.journal import Journal

    db_path = tmp_path / "journal.sqlite"
    with sqlite3.connect(db_path) as db:  # a journal of an earlier client: path TEXT
        db.execute("CREATE TABLE uploads (server TEXT NOT NULL, participant TEXT NOT NULL, item_id TEXT NOT NULL, "
                   "model_id TEXT NOT NULL, path TEXT NOT NULL, acked_at REAL NOT NULL, "
                   "PRIMARY KEY (server, participant, item_id))")
        db.execute("INSERT INTO uploads VALUES ('s', 'p', 'old', 'm@1', '/photos/old.jpg', 0)")
    odd = os.fsdecode(b"/photos/\xff\n.jpg")
    with Journal(db_path, "s", "p") as journal:
        journal.record([("new", "m@1", Path(odd))])
        assert journal.has("old") and journal.has("new")
        assert journal.paths() == ["/photos/old.jpg", odd]
