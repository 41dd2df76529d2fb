"""Unit tests of the client's parts: walking and skipping, labels CSV, journal, key
store, item ids, home files, HTTP retry policy, error lines."""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from client.api import CollectorAPI, HttpConfig
from client.home import Home, ParticipantConfig
from client.journal import Journal
from client.keystore import KeyStore, read_key_file
from client.labels import read_labels
from client.models import open_model_dir
from client.pipeline import item_id_for, read_photo
from client.walk import iter_files
from protocol.errors import (
    ImageError,
    InvalidInputError,
    KeyMismatchError,
    ModelIntegrityError,
    RateLimitedError,
    ServerUnavailableError,
)
from protocol.model_card import SparseSpec
from protocol.sparse_code import ambiguate, os_rng
from protocol.wire import ITEM_ID_RE


def _collect(paths):
    skipped: list[tuple[str, str]] = []
    files = list(iter_files(paths, lambda p, r: skipped.append((p, r))))
    return files, skipped


# --- walking ---------------------------------------------------------------------------
def test_walk_recurses_and_skips_links_out_of_the_given_paths(tmp_path: Path) -> None:
    root = tmp_path / "album"
    (root / "a" / "b").mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"1")
    (root / "a" / "b" / "y.jpg").write_bytes(b"2")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"3")
    (root / "out.jpg").symlink_to(outside)
    (root / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "inside.jpg").symlink_to(root / "x.jpg")
    (tmp_path / "other").mkdir()
    (root / "dirlink").symlink_to(tmp_path / "other", target_is_directory=True)
    os.mkfifo(root / "pipe.jpg")

    files, skipped = _collect([root])

    assert sorted(f.name for f in files) == ["x.jpg", "y.jpg"]  # the inside link is the same file
    reasons = {Path(p).name: r for p, r in skipped}
    assert set(reasons) == {"out.jpg", "broken.jpg", "dirlink", "pipe.jpg"}
    assert "outside" in reasons["out.jpg"] and "broken" in reasons["broken.jpg"]
    assert all(outside != f for f in files)


def test_walk_given_file_and_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "p.png"
    f.write_bytes(b"x")
    files, skipped = _collect([f, tmp_path / "nope"])
    assert files == [f.resolve()]
    assert len(skipped) == 1 and "nope" in skipped[0][0]


# --- labels ----------------------------------------------------------------------------
def test_labels_csv_binary_columns_and_minus_one(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,split,identity,Smiling,Male,Note\na.jpg,0,7,1,-1,hi\nb.jpg,2,9,-1,,x\n")
    notes: list[str] = []
    labels = read_labels(csv, on_note=notes.append)
    assert labels == {"a.jpg": {"Smiling": 1, "Male": 0}, "b.jpg": {"Smiling": 0}}
    assert len(notes) == 1 and "Note" in notes[0]


def test_labels_csv_tasks_and_errors(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,Smiling,Male\na.jpg,1,0\n")
    assert read_labels(csv, tasks=["Male"]) == {"a.jpg": {"Male": 0}}
    with pytest.raises(InvalidInputError, match="Young"):
        read_labels(csv, tasks=["Young"])
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,Smiling\na.jpg,1\na.jpg,0\n")
    with pytest.raises(InvalidInputError, match="twice"):
        read_labels(bad)
    bad.write_text("name,Smiling\na.jpg,1\n")
    with pytest.raises(InvalidInputError, match="filename"):
        read_labels(bad)


def test_labels_of_the_bundled_sample(sample_faces: Path) -> None:
    labels = read_labels(sample_faces / "labels.csv", tasks=["Smiling"])
    assert len(labels) == 48
    assert {v["Smiling"] for v in labels.values()} == {0, 1}


# --- item ids ----------------------------------------------------------------------------
def test_item_id_is_deterministic_valid_model_and_participant_specific(sample_images: list[Path]) -> None:
    from client.pipeline import legacy_item_id

    _, sha_a = read_photo(sample_images[0])
    _, sha_b = read_photo(sample_images[1])
    model1, model2 = "a" * 64, "b" * 64
    me, other = b"\x01" * 32, b"\x02" * 32
    ids = {item_id_for(me, sha_a, model1), item_id_for(me, sha_b, model1), item_id_for(me, sha_a, model2),
           item_id_for(other, sha_a, model1)}
    assert len(ids) == 4
    assert item_id_for(me, sha_a, model1) == item_id_for(me, read_photo(sample_images[0])[1], model1)
    assert all(ITEM_ID_RE.match(i) and len(i) == 64 for i in ids)
    # nobody without the secret recomputes it from the photo (the old unkeyed id)
    assert legacy_item_id(sha_a, model1) not in ids


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_read_photo_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """A path that became a FIFO after the folder walk: one clear error, no hang."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="photo.jpg: not a regular file"):
        read_photo(fifo)


def test_read_photo_refuses_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="e.jpg"):
        read_photo(empty)


# --- journal -----------------------------------------------------------------------------
def test_journal_survives_reopen_and_is_per_participant(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal(path, "http://s", "p1") as j:
        j.record([("i1", "m@1", "/a"), ("i2", "m@1", "/b")])
        j.record([("i1", "m@1", "/a")])  # a repeated acknowledgement is harmless
    with Journal(path, "http://s", "p1") as j, Journal(path, "http://s", "p2") as other:
        assert j.has("i1") and j.has("i2") and not j.has("i3")
        assert j.counts() == {"m@1": 2}
        assert not other.has("i1")
        assert j.clear() == 2
        assert not j.has("i1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- key store ----------------------------------------------------------------------------
def test_keystore_roundtrip_and_export_mode(tmp_path: Path) -> None:
    spec = SparseSpec(L=3, m=32, k=4, k_fake=4)
    code = np.zeros((3, 32), np.float32)
    code[:, :4] = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    amb, key = ambiguate(code, spec, os_rng())
    store_path = tmp_path / "keys.sqlite"
    with KeyStore(store_path) as store:
        store.put_many([("item1", "m@1", amb, key)])
        model_id, got_code, got_key = store.get("item1")
        assert store.get("nope") is None
        n = store.export(tmp_path / "keys.json")
    assert (model_id, got_key) == ("m@1", key)
    np.testing.assert_array_equal(got_code.indices, amb.indices)
    np.testing.assert_array_equal(got_code.values, amb.values)
    assert n == 1
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert read_key_file(tmp_path / "keys.json") == {"item1": key}


def test_key_file_rejects_other_formats(tmp_path: Path) -> None:
    f = tmp_path / "k.json"
    f.write_text(json.dumps({"format": "something", "version": 1, "keys": {}}))
    with pytest.raises(KeyMismatchError):
        read_key_file(f)


# --- home ---------------------------------------------------------------------------------
def test_config_is_private_and_token_not_in_repr(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    cfg = ParticipantConfig("http://127.0.0.1:1", "p1", "s3cret-token")
    path = home.save_config(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert home.load_config() == cfg
    assert "s3cret" not in repr(cfg)
    with pytest.raises(InvalidInputError, match="register"):
        Home(tmp_path / "empty").load_config()


# --- HTTP retries -------------------------------------------------------------------------
class _Flaky(BaseHTTPRequestHandler):
    """Answers the first `fail` requests with `status` (+ Retry-After), then 200."""

    fail = 2
    status = 503
    calls = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).calls += 1
        if type(self).calls <= type(self).fail:
            body = json.dumps({"error": "rate_limited" if self.status == 429 else "unavailable", "message": "busy"}).encode()
            self.send_response(self.status)
            self.send_header("Retry-After", "0")
        else:
            body = json.dumps({"participant_id": "p", "items": 3, "items_by_model": {}}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky_server():
    servers = []

    def start(fail: int, status: int) -> str:
        handler = type("H", (_Flaky,), {"fail": fail, "status": status, "calls": 0})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append((srv, handler))
        return f"http://127.0.0.1:{srv.server_port}", handler

    yield start
    for srv, _ in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("status", [429, 503])
def test_retries_transient_statuses_then_succeeds(flaky_server, status: int) -> None:
    url, handler = flaky_server(fail=2, status=status)
    api = CollectorAPI(url, "tok", HttpConfig(retries=3, backoff_s=0.01, timeout_s=5))
    assert api.me()["items"] == 3
    assert handler.calls == 3


def test_retries_are_bounded(flaky_server) -> None:
    url, handler = flaky_server(fail=100, status=429)
    api = CollectorAPI(url, "tok", HttpConfig(retries=2, backoff_s=0.01, timeout_s=5))
    with pytest.raises(RateLimitedError):
        api.me()
    assert handler.calls == 3


def test_unreachable_server_gives_one_clear_error() -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = CollectorAPI(f"http://127.0.0.1:{port}", "tok", HttpConfig(retries=1, backoff_s=0.01, timeout_s=2))
    with pytest.raises(ServerUnavailableError, match="cannot reach the collector") as info:
        api.me()
    assert "\n" not in info.value.message


def test_bad_server_url_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError):
        CollectorAPI("ftp://example")


# --- error lines (in-process CLI, offline transform) --------------------------------------
def _bomb_png(path: Path, side: int = 20000) -> None:
    """A tiny PNG whose header claims side x side pixels (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_transform_reports_each_bad_file_once_and_carries_on(cli, tmp_path: Path, sample_images, features_model_dir) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sample_images[:5]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:2000])
    (folder / "notes.txt").write_text("not a photo")
    _bomb_png(folder / "bomb.png")
    (folder / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    out = tmp_path / "f.npz"

    res = cli("--home", str(tmp_path / "h"), "transform", str(folder), "--out", str(out), "--model-dir", str(features_model_dir))

    assert res.rc == 0
    lines = [l for l in res.err.splitlines() if l.strip()]
    for bad in ("truncated.jpg", "notes.txt", "bomb.png", "broken.jpg"):
        assert sum(bad in l for l in lines) == 1, res.err
    assert len(lines) == 4
    assert "5 photos transformed" in res.out and "4 skipped" in res.out
    with np.load(out, allow_pickle=False) as z:
        assert z["features"].shape == (5, 16, 8, 8)
        assert sorted(Path(n).name for n in z["file_names"]) == sorted(p.name for p in good)
        assert np.isfinite(z["features"]).all()


def test_photo_over_pillows_pixel_limit_is_one_line_without_a_raw_warning(cli, tmp_path: Path, sample_images,
                                                                           features_model_dir) -> None:
    """A photo between Pillow's MAX_IMAGE_PIXELS (89.5 MP) and twice that made Pillow print
    its DecompressionBombWarning raw, and a real 118-MP PNG took the client to 559 MiB
    (issue 16, item 7). It is now skipped in one line before decoding, without the warning."""
    import warnings

    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(sample_images[0].read_bytes())
    side = int((Image.MAX_IMAGE_PIXELS * 1.3) ** 0.5)  # ~102 MP: above Pillow's limit, below MAX_PIXELS
    _bomb_png(folder / "panorama.png", side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = cli("transform", str(folder), "--out", str(tmp_path / "f.npz"), "--model-dir", str(features_model_dir),
                  "--workers", "1")
    assert res.rc == 0, res.err
    lines = [l for l in res.err.splitlines() if l.strip()]
    assert len(lines) == 1 and "panorama.png" in lines[0] and f"exceeds the limit of {Image.MAX_IMAGE_PIXELS}" in lines[0]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "1 photos transformed" in res.out and "1 skipped" in res.out


def test_transform_with_nothing_readable_exits_10(cli, tmp_path: Path, features_model_dir) -> None:
    (tmp_path / "x.txt").write_text("no")
    res = cli("--home", str(tmp_path / "h"), "transform", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o.npz"),
              "--model-dir", str(features_model_dir))
    assert res.rc == 10
    assert not (tmp_path / "o.npz").exists()


def test_not_registered_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    res = cli("--home", str(tmp_path / "h"), "status")
    assert res.rc == 2
    assert len(res.err.strip().splitlines()) == 1 and "register" in res.err


# --- preprocessing speed-up kept identical ---------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64, 3), (5, 48, 40, 3)])
def test_normalize_equals_its_documented_formula(shape: tuple[int, ...]) -> None:
    """protocol.normalize (channels-first fast path) == (x/255 - mean)/std then CHW, bit for bit."""
    from protocol.model_card import InputSpec
    from protocol.preprocess import normalize

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    spec = InputSpec(mean=tuple(rng.uniform(0, 1, 3)), std=tuple(rng.uniform(0.1, 1, 3)))
    reference = (pixels.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    got = normalize(pixels, spec)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.moveaxis(reference, -1, -3))


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_load_image_equals_always_calling_exif_transpose(orientation: int | None) -> None:
    """load_image skips ImageOps.exif_transpose (a full copy) for upright photos: pixels,
    size and mode stay those of open, draft, load, exif_transpose, RGB, bit for bit."""
    import io

    from PIL import Image, ImageOps

    from protocol.model_card import InputSpec
    from protocol.preprocess import _needed_size, load_image

    rng = np.random.default_rng(orientation or 0)
    img = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    spec = InputSpec()
    for with_spec in (None, spec):
        ref = Image.open(io.BytesIO(buf.getvalue()))
        if with_spec is not None:
            ref.draft("RGB", _needed_size(ref.size, spec))
        ref = ImageOps.exif_transpose(ref).convert("RGB")
        got = load_image(buf.getvalue(), with_spec)
        assert (got.mode, got.size) == (ref.mode, ref.size)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    turned = orientation in (5, 6, 7, 8)
    assert load_image(buf.getvalue()).size == ((300, 200) if turned else (200, 300))


@pytest.mark.parametrize("n", [1, 16, 37])
def test_extractor_runs_the_model_in_chunks_with_unchanged_outputs(features_model_dir, n: int) -> None:
    """Extractor.transform splits a batch into RUN_CHUNK-photo model calls: same rows, in
    order, as one model call per photo."""
    from client.models import open_model_dir
    from client.pipeline import RUN_CHUNK, Extractor
    from protocol.runtime import model_input

    card = open_model_dir(features_model_dir)
    ex = Extractor(card, features_model_dir, threads=1)
    pixels = np.random.default_rng(n).integers(0, 256, (n, card.input.height, card.input.width, 3), dtype=np.uint8)
    got = ex.transform(pixels)
    one_by_one = np.concatenate([ex.model(model_input(pixels[i:i + 1], card.input)) for i in range(n)])
    assert got.shape == (n, *card.output.shape)
    assert 37 > RUN_CHUNK  # one case spans several chunks and a partial one
    np.testing.assert_allclose(got, one_by_one, rtol=0, atol=1e-6)


def test_mpo_phone_photo_is_decoded_at_reduced_scale_like_a_jpeg() -> None:
    """Phone JPEGs with extra frames open as MPO: draft mode applies to them too, and the
    model input equals that of the same first frame saved as a plain JPEG."""
    import io

    from PIL import Image

    from protocol.model_card import InputSpec
    from protocol.preprocess import load_image, prepare

    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (1200, 900, 3), dtype=np.uint8))
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    photo.save(mpo, "MPO", save_all=True, append_images=[photo.resize((90, 120))], quality=90)
    photo.save(jpeg, "JPEG", quality=90)
    spec = InputSpec()
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    got = load_image(mpo.getvalue(), spec)
    assert got.width < photo.width // 4  # decoded at reduced scale
    np.testing.assert_array_equal(prepare(got, spec), prepare(load_image(jpeg.getvalue(), spec), spec))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_stream_keeps_input_order_and_skips_bad_photos_with_any_number_of_workers(
        features_model_dir, sample_images: list[Path], tmp_path: Path, workers: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos go to the decode pool DECODE_CHUNK at a time: rows still come out in input
    order, each bad photo is reported once, and the outputs equal a one-by-one transform."""
    import client.pipeline as pipeline
    from client.models import open_model_dir
    from client.pipeline import DECODE_CHUNK, Extractor

    monkeypatch.setattr(pipeline, "HAND_OVER_MIN_BYTES", 0)  # the test's thumbnails go to the pool too
    card = open_model_dir(features_model_dir)
    ex = Extractor(card, features_model_dir, threads=1)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(sample_images[0].read_bytes()[:300])
    files = [*sample_images[:7], bad, *sample_images[7:20], tmp_path / "missing.jpg"]
    assert len(files) > 2 * DECODE_CHUNK
    skipped: list[str] = []

    batches = list(ex.stream(files, 5, lambda p, r: skipped.append(p), workers=workers))

    rows = [row for b in batches for row in b]
    good = [f for f in files if f not in (bad, tmp_path / "missing.jpg")]
    assert [r.path for r in rows] == good
    # unreadable files are reported when read, undecodable ones when their chunk is decoded
    assert sorted(skipped) == sorted([str(bad), str(tmp_path / "missing.jpg")])
    assert all(len(b) == 5 for b in batches[:-1])
    one = np.stack([ex.transform(ex.decode(p.read_bytes(), p)[None])[0] for p in good])
    np.testing.assert_allclose(np.stack([r.output for r in rows]), one, rtol=0, atol=1e-6)


def test_stream_decodes_in_this_thread_too_when_the_decoders_hold_enough_bytes(
        features_model_dir, sample_images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Caller runs: with DECODE_CHUNK_BYTES already queued for the decoding thread (here:
    any photo), the streaming thread decodes the next chunk itself; order is kept."""
    import threading
    import time

    import client.pipeline as pipeline
    from client.pipeline import Extractor

    monkeypatch.setattr(pipeline, "DECODE_CHUNK_BYTES", 1)  # every photo is its own chunk, and "big"
    monkeypatch.setattr(pipeline, "HAND_OVER_MIN_BYTES", 0)
    card = open_model_dir(features_model_dir)
    ex = Extractor(card, features_model_dir, threads=1)
    decoded_by: list[str] = []
    plain_decode = ex.decode

    def slow_decode(data: bytes, path: Path) -> np.ndarray:
        decoded_by.append(threading.current_thread().name)
        time.sleep(0.01)  # a phone photo: the decoding thread is still busy when the next one is read
        return plain_decode(data, path)

    monkeypatch.setattr(ex, "decode", slow_decode)
    files = sample_images[:12]

    rows = [row for b in ex.stream(files, 4, lambda p, r: pytest.fail(f"{p}: {r}"), workers=2) for row in b]

    assert [r.path for r in rows] == files
    here = threading.current_thread().name
    assert decoded_by.count(here) >= 3 and sum(n.startswith("pric-decode") for n in decoded_by) >= 3


@pytest.mark.parametrize(("min_bytes", "pool_decodes"), [(10**9, False), (0, True)])
def test_stream_decodes_photos_smaller_than_the_hand_over_size_in_this_thread(
        features_model_dir, sample_images: list[Path], monkeypatch: pytest.MonkeyPatch,
        min_bytes: int, pool_decodes: bool) -> None:
    """Thumbnails (below HAND_OVER_MIN_BYTES on average per chunk) are decoded by the
    streaming thread itself: a decoding thread only adds GIL hand-offs for them. Photos at
    or above it go to the decoding threads."""
    import threading

    import client.pipeline as pipeline
    from client.pipeline import Extractor

    monkeypatch.setattr(pipeline, "HAND_OVER_MIN_BYTES", min_bytes)
    ex = Extractor(open_model_dir(features_model_dir), features_model_dir, threads=1)
    decoded_by: list[str] = []
    plain_decode = ex.decode

    def tracked(data: bytes, path: Path) -> np.ndarray:
        decoded_by.append(threading.current_thread().name)
        return plain_decode(data, path)

    monkeypatch.setattr(ex, "decode", tracked)
    files = sample_images[:24]
    rows = [row for b in ex.stream(files, 8, lambda p, r: pytest.fail(f"{p}: {r}"), workers=2) for row in b]
    assert [r.path for r in rows] == files
    assert len(decoded_by) == len(files)
    assert any(n.startswith("pric-decode") for n in decoded_by) == pool_decodes
    if not pool_decodes:
        assert set(decoded_by) == {threading.current_thread().name}


@pytest.mark.parametrize("n", [1, 5, 40])
def test_the_client_runs_a_float_and_a_device_graph_of_one_model_alike(features_model_dir, tmp_path: Path, n: int) -> None:
    """A card whose graph takes uint8 pixels (normalisation inside, what pric-export writes)
    and an older card whose graph takes the normalised float tensor give the same outputs:
    the client feeds each graph what its card states and never rewrites either."""
    import dataclasses
    import shutil

    from client.pipeline import Extractor
    from protocol.model_card import sha256_file
    from training.device_graph import PIXELS, device_graph

    card = open_model_dir(features_model_dir)
    assert card.input.dtype == "float32"
    device_dir = tmp_path / "device"
    shutil.copytree(features_model_dir, device_dir)
    (device_dir / card.file).write_bytes(device_graph((features_model_dir / card.file).read_bytes(), card.input))
    device_card = dataclasses.replace(card, sha256=sha256_file(device_dir / card.file),
                                      input=dataclasses.replace(card.input, dtype="uint8", name=PIXELS))
    pixels = np.random.default_rng(n).integers(0, 256, (n, card.input.height, card.input.width, 3), dtype=np.uint8)

    plain = Extractor(card, features_model_dir, threads=1).transform(pixels)
    inside = Extractor(device_card, device_dir, threads=1).transform(pixels)

    assert inside.shape == plain.shape == (n, *card.output.shape)
    np.testing.assert_allclose(inside, plain, rtol=1e-5, atol=1e-5 * float(np.abs(plain).max()))


def test_extractor_refuses_a_card_whose_model_is_not_onnx_in_one_line(features_model_dir, tmp_path: Path) -> None:
    """A card whose sha256 matches bytes that are not an ONNX model (a hostile or broken
    collector): ModelIntegrityError naming the file, not a protobuf traceback."""
    import shutil

    from client.pipeline import Extractor
    from protocol.model_card import ModelCard, sha256_file

    folder = tmp_path / "m"
    shutil.copytree(features_model_dir, folder)
    card = open_model_dir(folder)
    model_file = folder / card.file
    model_file.write_bytes(model_file.read_bytes()[:300])
    card = ModelCard.from_json(card.to_json().replace(card.sha256, sha256_file(model_file)))
    with pytest.raises(ModelIntegrityError, match="onnxruntime cannot load the model"):
        Extractor(card, folder, threads=1)


def test_extractor_refuses_a_model_file_changed_after_its_card(features_model_dir, tmp_path: Path) -> None:
    """The bytes onnxruntime gets are the ones checked against the card's sha256."""
    import shutil

    from client.pipeline import Extractor

    folder = tmp_path / "m"
    shutil.copytree(features_model_dir, folder)
    card = open_model_dir(folder)
    model_file = folder / card.file
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Extractor(card, folder, threads=1)
