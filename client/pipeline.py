"""Photo → released arrays, streaming in batches.

    file ─► read bytes (size guard) ─► sha256 ─► item id = HMAC(participant's secret,
            photo sha256 ‖ model sha256)
         ─► protocol.preprocess load_image + prepare (decode with draft, EXIF, RGB, crop,
            resize)                                     → uint8 (H, W, 3)
         ─► stack B photos                              → uint8 (B, H, W, 3)
         ─► ONNX: normalise inside the graph, then the card's model
                                                        → (B, *card.output.shape)
         ─► features: {"feature": (…)}  |  sparse_code: ambiguate each (L, m) code
                                                        → {"indices": (L, k'), "values": (L, k')}

A card with an alignment section (protocol.align) turns each photo into its faces instead:

    file ─► read, sha256 ─► protocol.align.Aligner: decode (EXIF, reduced scale), detect,
            per face: align into the card's frame (cut from the best resolution available)
         ─► prepare (crop_box, resize) each face    → one item per face (or the largest),
            item id = HMAC(secret, sha256(photo sha256 ‖ face index) ‖ model sha256)
    no face: skipped with one line; a face below min_face px: counted; a face that cannot
    be aligned (too small, degenerate transform): one line, nothing sent for it.

Only one batch of photos is held in memory at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import stat
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from protocol.runtime import OnnxModel, model_input
from protocol.errors import FaceError, ImageError, ImageTooLargeError, InvalidInputError, ModelIntegrityError
from protocol.model_card import ModelCard
from protocol.preprocess import MAX_FILE_BYTES, MAX_PIXELS, load_image, prepare
from protocol.sparse_code import (AmbiguatedCode, CodeDecoys, DecoyBank, ambiguate, code_to_arrays, decoy_fakes, os_rng,
                                  read_decoys)

ITEM_ID_HEX = 64  # an HMAC-SHA256 in hex (protocol.routes.MAX_ITEM_ID_LEN)
LEGACY_ITEM_ID_HEX = 40  # ids before they were keyed: sha256 of photo and model, 40 hex digits
# photos per onnxruntime call (the stream's batch size is how many are yielded at a time)
RUN_CHUNK = 16
# photos per decode task handed to the thread pool: handing over photo by photo cost more
# CPU than it saved on small photos (GIL hand-offs, one future each)
DECODE_CHUNK = 8
DECODE_CHUNK_BYTES = 4 * 1024 * 1024  # ... or fewer, so that large phone photos go one by one
# ... and only photos of at least this many bytes on average: smaller ones decode here.
# Measured on 2 cores (pric-male@5, photos/s of 1 vs 2 threads): 2.7–4 KiB files (celeba's
# 89x109) gained nothing from a decoding thread and cost 1.5x the CPU (the GIL hand-offs of
# many short Pillow calls); 7 KiB +13 %, 11 KiB +21 %, 24 KiB +35 %, 87 KiB +59 %.
HAND_OVER_MIN_BYTES = 6 * 1024
# onnxruntime intra-op threads of the on-device model. One: the model is small (a few M
# multiply-adds per photo), so waking a second thread for each of its ops costs more CPU
# than it saves, and the other cores decode the next photos meanwhile.
ORT_THREADS = 1
# batches handed to the model thread and not yet yielded, at most (workers > 1)
MODEL_AHEAD = 2
T = TypeVar("T")
_heif_registered = False
FACE_CHOICES = ("all", "largest")
# faces whose box is smaller than this (photo pixels) are left out and counted: the
# detector's own smallest face (protocol.faces.DetectorSpec.min_face)
DEFAULT_MIN_FACE = 20
# a decoded item: (item id, prepared pixels), or (None, why the photo or face is skipped),
# or (None, SMALL_FACE) for a face left out for its size
SMALL_FACE = "small"


def client_max_pixels() -> int:
    """Largest photo the client decodes, in pixels: Pillow's MAX_IMAGE_PIXELS (89.5 MP by
    default), below protocol.preprocess.MAX_PIXELS. A photo above it is skipped with one
    line before decoding: a 118-MP PNG took the client to 559 MiB (one full RGB decode,
    PNG has no reduced-scale decoding) and Pillow printed its DecompressionBombWarning raw."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return min(int(limit), MAX_PIXELS) if limit else MAX_PIXELS


def quiet_bomb_warnings() -> None:
    """Pillow warns at open for a photo between MAX_IMAGE_PIXELS and twice that; the client
    refuses all of those itself (client_max_pixels) in one line, so the raw warning would
    only repeat it. A process-wide filter, set before any decoding thread starts
    (warnings.catch_warnings is not thread-safe)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF (pillow-heif), once, on first use rather than at import."""
    global _heif_registered
    if _heif_registered:
        return
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:  # optional: without it HEIC files are reported as unreadable
        pass
    _heif_registered = True


def item_id_for(item_key: bytes, photo_sha256: str, model_sha256: str) -> str:
    """Item id = HMAC-SHA256(participant's secret, photo sha256 ‖ model sha256), hex.
    Deterministic for this participant (a retried or repeated upload is recognised by the
    collector and the journal), but nobody without the secret can recompute it from the
    photo, and the same photo gets unrelated ids from two participants or registrations."""
    msg = bytes.fromhex(photo_sha256) + bytes.fromhex(model_sha256)
    return hmac.digest(item_key, msg, "sha256").hex()


def face_digest(photo_sha256: str, index: int) -> str:
    """What stands for the photo in a face's item id: sha256(photo sha256 ‖ face index), so
    each face of a photo has its own id, the same on every run (the detector is
    deterministic and faces come largest first), and resume skips exactly the faces sent."""
    return hashlib.sha256(bytes.fromhex(photo_sha256) + b"pric-face" + index.to_bytes(4, "big")).hexdigest()


def legacy_item_id(photo_sha256: str, model_sha256: str) -> str:
    """The unkeyed id clients sent before item ids were keyed: journals and key stores
    written then hold it, and the collector stored the photo under it (client.cli's
    Uploader keeps using it for those photos, so they are not uploaded again)."""
    return hashlib.sha256(f"pric-item:{photo_sha256}:{model_sha256}".encode()).hexdigest()[:LEGACY_ITEM_ID_HEX]


def item_ids(item_key: bytes, model_sha256: str) -> Callable[[str], str]:
    """photo sha256 → item id under one model (item_id_for with the key bound)."""
    model = bytes.fromhex(model_sha256)
    return lambda photo_sha256: hmac.digest(item_key, bytes.fromhex(photo_sha256) + model, "sha256").hex()


def read_photo(path: Path) -> tuple[bytes, str]:
    """File → (bytes, sha256 hex). Raises ImageError naming the file. Opened without
    blocking and checked to be a regular file after opening, so a path swapped for a FIFO
    or a device after the folder walk cannot hang or feed the client. Plain os calls, no
    file object: 7 instead of 12 µs per small photo."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{path}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ImageTooLargeError(_too_large(path))
            if st.st_size == 0:
                raise ImageError(f"{path}: empty file")
            data = os.read(fd, st.st_size + 1)  # a regular file: all of it, unless it grew
            if len(data) > st.st_size:
                parts, total = [data], len(data)
                while total <= MAX_FILE_BYTES and (more := os.read(fd, 1 << 20)):
                    parts.append(more)
                    total += len(more)
                if total > MAX_FILE_BYTES:
                    raise ImageTooLargeError(_too_large(path))
                data = b"".join(parts)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return data, hashlib.sha256(data).hexdigest()


def _too_large(path: Path) -> str:
    return f"{path}: file is larger than {MAX_FILE_BYTES // 2**20} MiB"


class Row(NamedTuple):
    """One transformed photo: its path, item id, and model output (*card.output.shape)."""

    path: Path
    item_id: str
    output: np.ndarray
    face: int | None = None  # the face's index in its photo (cards with alignment)


class Extractor:
    """The card's model on this device: preprocessing from the card, onnxruntime."""

    def __init__(self, card: ModelCard, model_dir: Path, threads: int | None = None,
                 item_id: Callable[[str], str] | None = None, faces: str = "all",
                 min_face: float = DEFAULT_MIN_FACE) -> None:
        """`threads`: onnxruntime intra-op threads (0: one per core; None: ORT_THREADS).
        `item_id`: photo sha256 → item id (default: keyed with a secret of this Extractor
        alone, so ids mean nothing outside it; the client passes the participant's).
        `faces`, `min_face`: for a card with alignment, every face or the largest, and the
        smallest face box (photo pixels) sent."""
        threads = ORT_THREADS if threads is None else threads
        if faces not in FACE_CHOICES:
            raise InvalidInputError(f"--faces {faces!r}: expected one of {', '.join(FACE_CHOICES)}")
        if not (isinstance(min_face, (int, float)) and 0 <= min_face <= 100_000):
            raise InvalidInputError(f"--min-face {min_face!r}: must be a number of pixels in 0..100000")
        self.faces, self.min_face = faces, float(min_face)
        self.small_faces = 0  # faces left out for their size (counted as they are settled)
        self.item_id = item_id or item_ids(secrets.token_bytes(32), card.sha256)
        register_heif()
        quiet_bomb_warnings()
        self.max_pixels = client_max_pixels()
        self.card = card
        self.out_shape = tuple(int(d) for d in card.output.shape)
        # onnxruntime gets the very bytes whose sha256 is checked here (the file could
        # have changed since open_model_dir checked it)
        path = model_dir / card.file
        self._graph = path.read_bytes()
        if hashlib.sha256(self._graph).hexdigest() != card.sha256:
            raise ModelIntegrityError(f"{path}: sha256 differs from the card's; refusing to use model {card.model_id}")
        # the card's graph runs as it is: what the auditor ran, byte for byte
        self.model = OnnxModel(path, card.input.name, card.output.name, threads=threads, graph=self._graph)
        self.aligner = None
        self.detail = 1.0
        if card.alignment is not None:
            from protocol.align import Aligner, model_detail

            # the detector's files are checked against the card's sha256 (which the
            # attestation binds) as they are read, before onnxruntime sees them
            self.aligner = Aligner(card.alignment, model_dir, threads=threads)
            # the model keeps this fraction of the frame's pixels: a face is cut from the
            # smallest decode that holds it at that resolution (a 12-MP photo's face rarely
            # needs the full-resolution decode)
            self.detail = model_detail(tuple(card.alignment.frame), card.input)
        self.decoys = load_decoys(card, model_dir)

    def decode(self, data: bytes, path: Path) -> np.ndarray:
        """Photo bytes → uint8 (H, W, 3), cropped and resized per the card's input spec
        (normalised later, a batch at a time: same values, a quarter of the bytes held)."""
        spec = self.card.input
        return prepare(load_image(data, spec, max_pixels=self.max_pixels, name=str(path)), spec)

    def decode_items(self, data: bytes, path: Path, key: str) -> list[tuple[str | None, object]]:
        """Photo bytes → its items: [(item id, uint8 (H, W, 3))], or (None, ImageError) for
        what is skipped with a line, (None, SMALL_FACE) for a face left out for its size.
        `key` is the photo's item id, or with alignment the photo's sha256."""
        try:
            if self.aligner is None:
                return [(key, self.decode(data, path))]
            got = self.aligner.photo(data, str(path), max_pixels=self.max_pixels, which=self.faces,
                                     min_face=self.min_face, detail=self.detail)
        except ImageError as exc:
            return [(None, exc)]
        items: list[tuple[str | None, object]] = [(None, SMALL_FACE)] * got.small
        if not got.faces and not got.small:
            items.append((None, FaceError(f"{path}: no face found")))
        spec = self.card.input
        for f in got.faces:
            if f.error is not None:
                items.append((None, FaceError(f"{path}: {f.error.message}")))
            else:
                items.append((self.item_id(face_digest(key, f.index)), (f.index, prepare(f.image, spec))))
        return items

    def _settle(self, path: Path, items: list[tuple[str | None, object]], on_skip: Callable[[str, str], None],
                skip_known: Callable[[Path, str], bool], ready: list[tuple[Path, str, np.ndarray, int | None]]) -> None:
        """A photo's decoded items into `ready`, in this (the calling) thread: skips reported,
        small faces counted, and with alignment each face's id checked against skip_known
        (which the client's journal answers; not thread-safe)."""
        for item_id, out in items:
            if isinstance(out, ImageError):
                on_skip(str(path), _reason(out.message, path))
            elif isinstance(out, str):
                self.small_faces += 1
            elif isinstance(out, tuple):
                assert item_id is not None
                if not skip_known(path, item_id):
                    ready.append((path, item_id, out[1], out[0]))
            else:
                assert item_id is not None
                ready.append((path, item_id, out, None))  # type: ignore[arg-type]

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) → model output (B, *card.output.shape): the pixels go into the
        graph as they are (card input dtype uint8: normalisation inside the graph), or
        normalised first for an older float32 graph (protocol.runtime.model_input)."""
        return self._chunked(self.model, model_input(pixels, self.card.input))

    def _chunked(self, model: OnnxModel, x: np.ndarray) -> np.ndarray:
        """The model on RUN_CHUNK photos at a time: their activations stay in the CPU caches
        (measured ~10% less CPU per photo than batches of 64; outputs identical)."""
        parts = [model(x[i:i + RUN_CHUNK]) for i in range(0, len(x), RUN_CHUNK)] or [model(x)]
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if tuple(y.shape[1:]) != self.out_shape:
            raise ModelIntegrityError(
                f"{self.card.model_id}: model output has shape {tuple(y.shape[1:])}, the card states {self.out_shape}"
            )
        return y.astype(self.card.output.dtype, copy=False)

    def stream(
        self,
        files: Iterable[Path],
        batch_size: int,
        on_skip: Callable[[str, str], None],
        skip_known: Callable[[Path, str], bool] = lambda _p, _i: False,
        tick: Callable[[], None] = lambda: None,
        workers: int = 1,
    ) -> Iterator[list[Row]]:
        """Yield batches of transformed photos, in input order. `skip_known(path, item_id)`
        returning True means the photo is handled elsewhere (already uploaded, code kept)
        and is not decoded. Unreadable photos go to `on_skip(path, reason)` and the stream
        carries on. With `workers` = 1 this thread does everything. With more, this
        thread reads and hashes, a model thread runs each batch through onnxruntime (which
        releases the GIL) while the next photos are decoded, and workers − 1 decoding
        threads (Pillow releases the GIL too) decode DECODE_CHUNK photos (or
        DECODE_CHUNK_BYTES) per task. When they already hold `window` chunks or
        DECODE_CHUNK_BYTES per thread not yet decoded, or when the chunk's photos are
        smaller than HAND_OVER_MIN_BYTES on average (their decoding is bound by the GIL),
        this thread decodes the chunk itself ("caller runs"): a second decoder for phone
        photos, and no hand-offs for thumbnails. At most 2·window+1 chunks' bytes are held."""
        photos = self._to_decode(files, on_skip, skip_known, tick)
        if workers <= 1:
            yield from self._stream_here(photos, batch_size, on_skip, skip_known)
            return
        pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="pric-decode")
        # the model runs in a thread of its own (onnxruntime releases the GIL), one batch at
        # a time, while this thread reads and decodes the next photos
        model_pool = ThreadPoolExecutor(1, thread_name_prefix="pric-model")
        # batches handed to the model, in order: (their photos, the model's future output)
        finished: deque[tuple[list[_Ready], Future[np.ndarray]]] = deque()
        window = 2 * workers + 2  # chunks handed to the decoding threads at most
        # (chunk, its bytes): decoded or being decoded, in input order
        inflight: deque[tuple[Future[list[tuple[Path, list[tuple[str | None, object]]]]], int]] = deque()
        chunk: list[tuple[Path, str, bytes]] = []
        chunk_bytes = 0
        ready: list[_Ready] = []

        def settle_one() -> None:
            for path, items in inflight.popleft()[0].result():
                self._settle(path, items, on_skip, skip_known, ready)

        def to_model(pending: list[_Ready]) -> None:
            # stacked here: the model thread then needs the GIL only around each
            # onnxruntime call, not for numpy and Python work that would contend with this one
            x = np.stack([x for _, _, x, _ in pending])
            finished.append((pending, model_pool.submit(self.transform, x)))

        def submit_chunk() -> None:
            chunks, nbytes = _queued(inflight)
            hand_over = (chunk_bytes >= HAND_OVER_MIN_BYTES * len(chunk) and chunks < window
                         and nbytes < DECODE_CHUNK_BYTES * (workers - 1))
            inflight.append((_submit(pool if hand_over else None, self._decode_chunk, list(chunk)), chunk_bytes))
            chunk.clear()

        try:
            for photo in photos:
                chunk.append(photo)
                chunk_bytes += len(photo[2])
                if len(chunk) >= DECODE_CHUNK or chunk_bytes >= DECODE_CHUNK_BYTES:
                    submit_chunk()
                    chunk_bytes = 0
                while inflight and (inflight[0][0].done() or len(inflight) > 2 * window):
                    settle_one()
                while len(ready) >= batch_size:
                    to_model(ready[:batch_size])
                    del ready[:batch_size]
                while finished and (finished[0][1].done() or len(finished) > MODEL_AHEAD):
                    pending, out = finished.popleft()
                    yield _rows(pending, out.result())
            if chunk:
                submit_chunk()
            while inflight:
                settle_one()
            while ready:
                to_model(ready[:batch_size])
                del ready[:batch_size]
            while finished:
                pending, out = finished.popleft()
                yield _rows(pending, out.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            model_pool.shutdown(wait=True, cancel_futures=True)

    def _to_decode(
        self,
        files: Iterable[Path],
        on_skip: Callable[[str, str], None],
        skip_known: Callable[[Path, str], bool],
        tick: Callable[[], None],
    ) -> Iterator[tuple[Path, str, bytes]]:
        """(path, item id, file bytes) of each photo to decode: read and hashed here;
        unreadable files go to on_skip, known ones are left out; tick() once per file.
        With alignment the photo's sha256 stands in for the item id: each face has its
        own, known only after detection (Extractor._settle asks skip_known then)."""
        id_of = self.item_id
        for path in files:
            try:
                data, sha = read_photo(path)
            except ImageError as exc:
                on_skip(str(path), _reason(exc.message, path))
                tick()
                continue
            tick()
            if self.aligner is not None:
                yield path, sha, data
                continue
            item_id = id_of(sha)
            if not skip_known(path, item_id):
                yield path, item_id, data

    def _stream_here(
        self, photos: Iterable[tuple[Path, str, bytes]], batch_size: int, on_skip: Callable[[str, str], None],
        skip_known: Callable[[Path, str], bool],
    ) -> Iterator[list[Row]]:
        """stream() with one thread: decode each photo as it comes, no hand-over
        (the bookkeeping of the threaded path cost ~30 µs per small photo here)."""
        ready: list[_Ready] = []
        for path, key, data in photos:
            self._settle(path, self.decode_items(data, path, key), on_skip, skip_known, ready)
            while len(ready) >= batch_size:
                yield self._finish(ready[:batch_size])
                del ready[:batch_size]
        if ready:
            yield self._finish(ready)

    def _decode_chunk(self, chunk: list[tuple[Path, str, bytes]]) -> list[tuple[Path, list[tuple[str | None, object]]]]:
        """Decode several photos in one pool task (one hand-over per chunk, not per photo);
        a bad photo's ImageError is returned in its place, the others go on."""
        return [(path, self.decode_items(data, path, key)) for path, key, data in chunk]

    def _finish(self, pending: list[_Ready]) -> list[Row]:
        return _rows(pending, self.transform(np.stack([x for _, _, x, _ in pending])))


# a decoded item waiting for the model: (path, item id, uint8 (H, W, 3), face index or None)
_Ready = tuple[Path, str, np.ndarray, "int | None"]


def _rows(pending: list[_Ready], y: np.ndarray) -> list[Row]:
    """Rows of a batch of photos from their model outputs."""
    return [Row(path=p, item_id=i, output=y[n], face=f) for n, (p, i, _, f) in enumerate(pending)]


def _submit(pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: object) -> "Future[T]":
    """fn(*args) in the pool, or now (as a finished future) without one."""
    if pool is not None:
        return pool.submit(fn, *args)
    fut: Future[T] = Future()
    fut.set_result(fn(*args))  # _decode_chunk returns a bad photo's error in its place
    return fut


def _queued(inflight: Iterable[tuple[Future, int]]) -> tuple[int, int]:
    """(chunks, bytes) handed over and not decoded yet."""
    pending = [size for fut, size in inflight if not fut.done()]
    return len(pending), sum(pending)


def default_workers() -> int:
    """Threads working on photos (Extractor.stream): one per CPU core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _reason(message: str, path: Path) -> str:
    """Error message without its leading '<path>: ' (the caller names the file)."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def load_decoys(card: ModelCard, model_dir: Path) -> DecoyBank | CodeDecoys | None:
    """The card's decoys (sparse.decoys: a decoy bank, or decoy codes for a card with
    sparse.magnitudes "key"), read from the very bytes whose sha256 is checked here; None
    for a card without them (uniform fakes)."""
    if card.kind != "sparse_code" or card.sparse is None or card.sparse.decoys is None:
        return None
    path = model_dir / card.sparse.decoys
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != card.extra_files.get(card.sparse.decoys):
        raise ModelIntegrityError(f"{path}: sha256 differs from the card's; refusing to use model {card.model_id}")
    return read_decoys(io.BytesIO(data), card.sparse)


def ambiguate_output(card: ModelCard, code: np.ndarray,
                     decoys: DecoyBank | CodeDecoys | None = None) -> tuple[AmbiguatedCode, bytes]:
    """Dense code (L, m) → (public ambiguated code, secret key), OS randomness; fakes from
    the card's decoys when it has them (pass `Extractor.decoys`)."""
    assert card.sparse is not None
    if card.sparse.decoys is not None and decoys is None:
        raise ModelIntegrityError(f"model {card.model_id} draws fakes from {card.sparse.decoys}; it was not loaded")
    return ambiguate(np.asarray(code, dtype=np.float32), card.sparse, os_rng(),
                     fakes=decoy_fakes(decoys))


def wire_arrays_of(card: ModelCard, output: np.ndarray | None, code: AmbiguatedCode | None) -> dict[str, np.ndarray]:
    """The arrays one item carries on the wire (protocol.model_card.wire_arrays)."""
    if card.kind == "sparse_code":
        assert code is not None and card.sparse is not None
        return code_to_arrays(code, card.sparse)
    assert output is not None
    return {card.output.name: np.ascontiguousarray(output)}


class NpyStreamWriter:
    """Append rows of a fixed shape/dtype to a temporary raw file, then write them as one
    `.npy` member of a zip (npz), so a transform of N photos holds one batch in memory."""

    def __init__(self, tmp_path: Path, row_shape: tuple[int, ...], dtype: str) -> None:
        self.tmp_path = tmp_path
        self.row_shape = row_shape
        self.dtype = np.dtype(dtype)
        self.n = 0
        self._f = open(tmp_path, "wb")

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self._f.write(rows.tobytes())
        self.n += rows.shape[0]

    def write_member(self, zf: zipfile.ZipFile, name: str) -> None:
        self._f.close()
        with zf.open(name + ".npy", "w", force_zip64=True) as out, open(self.tmp_path, "rb") as src:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.n, *self.row_shape)}
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.unlink(self.tmp_path)

    def discard(self) -> None:
        self._f.close()
        Path(self.tmp_path).unlink(missing_ok=True)


def write_npz_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    """Add one small array to an open npz (allow_pickle=False readable)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    zf.writestr(name + ".npy", buf.getvalue())
