"""Issue 2's acceptance check, the way a user runs it: a collector started as a process
with the shipped model, `pric-client` as a process on 40 celeba-10k photos plus a corrupt
file, a repeated upload, withdrawal; and the shipped models' cards match their files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collector.launch import start_collector, stop
from protocol.model_card import CARD_FILE, load_card, sha256_file

REPO = Path(__file__).resolve().parents[1]
EXPORTED = REPO / "exported_models"
SHIPPED = sorted(d for d in EXPORTED.iterdir() if (d / CARD_FILE).is_file()) if EXPORTED.is_dir() else []


def client(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model_dir", SHIPPED, ids=[d.name for d in SHIPPED])
def test_shipped_card_matches_its_files(model_dir: Path):
    card = load_card(model_dir)  # raises unless every file's sha256 matches the card
    assert sha256_file(model_dir / card.file) == card.sha256
    assert (model_dir / card.file).stat().st_size <= 5 * 2**20
    assert card.training, "the card states what the model was trained on and against"


def test_a_collector_serving_the_shipped_models_makes_pric_male_6_current_by_default():
    """Without --current-model the collector serves the newest features release
    (collector.registry._preference): pric-male@6, not a release that only suits aligned
    faces or a research mode."""
    from collector.registry import _preference

    cards = [load_card(d, verify=False) for d in SHIPPED if d.name != "face-detector"]
    assert max(cards, key=lambda c: _preference(c.kind, c.version, c.model_id)).model_id == "pric-male@6"


def test_a_model_is_shipped():
    kinds = {load_card(d, verify=False).kind for d in SHIPPED}
    assert "features" in kinds


@pytest.mark.slow
@pytest.mark.realdata
def test_forty_photos_and_a_corrupt_file_end_to_end(celeba_dir: Path, tmp_path: Path):
    album = tmp_path / "album"
    album.mkdir()
    for photo in sorted((celeba_dir / "images").glob("*.jpg"))[:40]:
        shutil.copy(photo, album / photo.name)
    good = (album / "000001.jpg").read_bytes()
    (album / "zz_corrupt.jpg").write_bytes(good[: len(good) // 3])
    home = tmp_path / "home"
    # the decision release: the features release's attestation refuses 41 photos of one person
    # under the default policy (test below)
    server, url = start_collector(tmp_path / "collector", EXPORTED, "--current-model", "pric-male-decision@2")
    try:
        assert client(home, "register", "--server", url).returncode == 0

        first = client(home, "upload", str(album), "--yes")  # the shipped model, attested by the release key
        assert first.returncode == 0, first.stderr
        error_lines = [l for l in first.stderr.splitlines() if "zz_corrupt.jpg" in l]
        assert len(error_lines) == 1
        assert first.stdout.strip().splitlines()[-1].startswith("40 stored")

        second = client(home, "upload", str(album))  # consent is remembered
        assert second.returncode == 0
        assert second.stdout.strip().splitlines()[-1].startswith("0 stored")

        status = json.loads(client(home, "status", "--json").stdout)
        assert status["items"] == 40

        withdrawn = client(home, "withdraw", "--keep-token")
        assert withdrawn.returncode == 0 and "40" in withdrawn.stdout
        assert json.loads(client(home, "status", "--json").stdout)["items"] == 0
    finally:
        stop(server)


@pytest.mark.slow
@pytest.mark.realdata
def test_the_per_person_bound_counts_every_photo_already_sent(celeba_dir: Path, tmp_path: Path):
    """pric-male@6's signed linkage figures: 3 photos of one person pass the default policy
    (pooled 0.834 <= 0.600 + 0.25), 6 would not (0.925 at 10): three more photos in a second
    upload are refused, because the collector links both uploads to one participant."""
    photos = sorted((celeba_dir / "images").glob("*.jpg"))[:6]
    first_album, second_album = tmp_path / "a", tmp_path / "b"
    for album, part in ((first_album, photos[:3]), (second_album, photos[3:])):
        album.mkdir()
        for photo in part:
            shutil.copy(photo, album / photo.name)
    home = tmp_path / "home"
    server, url = start_collector(tmp_path / "collector", EXPORTED, "--current-model", "pric-male@6")
    try:
        assert client(home, "register", "--server", url).returncode == 0
        first = client(home, "upload", str(first_album), "--yes")
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip().splitlines()[-1].startswith("3 stored")
        again = client(home, "upload", str(first_album), "--yes")  # a rerun adds no photo
        assert again.returncode == 0, again.stderr
        second = client(home, "upload", str(second_album), "--yes")
        assert second.returncode == 13, second.stdout + second.stderr
        assert "for 6 photos of yours at this collector" in second.stderr
    finally:
        stop(server)
