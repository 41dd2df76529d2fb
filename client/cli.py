"""`pric-client`: the participant's command-line client.

    pric-client [--home DIR] register --server URL [--force] [--ca-bundle FILE] [--insecure]
    pric-client [--home DIR] upload PATH... [--labels CSV] [--tasks T1,T2]
                [--mode features|ambiguated] [--batch-size N] [--workers N] [--dry-run]
                [--save-codes FILE] [--yes]
    pric-client [--home DIR] transform PATH... --out FILE.npz [--model-dir DIR] [--batch-size N]
                [--workers N] [--yes]
    pric-client [--home DIR] trust add FILE | list | remove KEYID
    pric-client [--home DIR] policy show | set KEY VALUE | reset
    pric-client [--home DIR] status [--json]
    pric-client [--home DIR] withdraw
    pric-client [--home DIR] keys export --out FILE [--items ID ...] [--model MODEL_ID]
    pric-client [--home DIR] page-key --out FILE [--force]
    pric-client [--home DIR] decode --key-file K --codes FILE.npz --out DIR [--model-dir DIR]

`--home` defaults to $PRIC_CLIENT_HOME, else the per-user config folder (platformdirs).
Unreadable photos (corrupt, truncated, not an image, too large, broken symlink, link out of
the given paths) are reported on stderr, one line each naming the file, and skipped.
`upload` ends with one line: "N stored, M already there, K skipped (errors)" (already there:
acknowledged before, per the local journal or the collector, or a byte-identical copy).

Before a model is first used (upload; transform of a cached model), the client verifies
its signed audit attestations against your trust store, checks your policy, shows what the
model keeps and hides and who audited it, and asks for your consent (remembered per model;
`--yes` consents in scripts). Nothing is uploaded or journalled if any step fails.

Exit codes:
    0   done (at least one photo processed; some may have been skipped)
    1   other error
    2   invalid input (argument, file, labels CSV, not registered yet, plain http:// to
        another machine without --insecure, a --ca-bundle that is no PEM bundle, an id in a
        codes file that is not a plain file name)
    3   the collector refused the payload (format, validation, size)
    4   model problem: unknown or retired on the collector (run upload again to update),
        a model file whose sha256 does not match its card or over 256 MiB (refused), a
        model card out of bounds, or no valid attestation: none served, tampered or
        truncated, signed by no key you trust, or for other bytes or another card
    5   a key does not match its code (decode)
    6   authentication or permission refused (wrong or revoked token)
    7   not found on the collector
    8   rate limited, still after retries
    9   collector unreachable or failing (any HTTP 5xx, an answer too large or not JSON,
        a redirect), after retries, or at once when it asks to wait more than 30 s
    10  nothing could be processed (no readable photo among the given paths)
    11  the run's deadline (--deadline) passed while waiting for the collector (it hangs,
        or answers too slowly); run the same command again later: uploads resume
    12  the collector's TLS certificate could not be verified (pass --ca-bundle FILE if
        its operator uses a private CA)
    13  refused by your policy: an attested figure above your bound, a sparse model asking
        for fewer fakes than this client's minimum, no consent (answered no, or no terminal
        to ask and no --yes), or a `policy set` looser than the current value
    130 interrupted

TLS: use the collector's https:// URL. Certificates are verified against the system's CA
store, or against --ca-bundle FILE (a private CA). Plain http:// is refused (exit 2) to any
host but this machine (localhost, 127.0.0.0/8, ::1) unless --insecure is given: the token
and the features would cross the network unencrypted. register remembers both choices.

Limits on what the collector sends: a model card of at most 256 KiB asking for an input
of at most 1024x1024 and at most 2^20 output values per photo, JSON answers of at most
1 MiB, model files of at most 256 MiB (streamed to disk, sha256-checked), `Retry-After`
honoured up to 30 s. `--deadline` bounds the whole run: default 600 s, for upload 600 s
plus 1 s per photo found.

Environment: PRIC_CLIENT_HOME (home folder), PRIC_CLIENT_RETRIES / PRIC_CLIENT_BACKOFF
(HTTP retry policy), PRIC_CLIENT_TEST_DELAY_S (test hook: sleep before each batch is sent
and again before it is journalled, to test interruptions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from client.api import DEFAULT_DEADLINE_S, UPLOAD_DEADLINE_PER_PHOTO_S, CollectorAPI, Deadline, HttpConfig
from client.auditors import TrustStore
from client.display import printable
from client.home import Home, ParticipantConfig, default_home
from client.journal import Journal
from client.keystore import KeyStore, read_key_file
from client.labels import read_labels
from client.models import OnnxModel, fetch_model, find_cached_model, open_model_dir
from client.pipeline import (
    DEFAULT_MIN_FACE,
    FACE_CHOICES,
    LEGACY_ITEM_ID_HEX,
    Extractor,
    NpyStreamWriter,
    ambiguate_output,
    default_workers,
    item_ids,
    legacy_item_id,
    wire_arrays_of,
    write_npz_member,
)
from client.verify import POLICY_HELP, Policy, approve
from client.walk import iter_files
from protocol.attestation import load_envelopes
from protocol.errors import InvalidInputError, KeyMismatchError, ModelIntegrityError, PricError
from protocol.model_card import ModelCard
from protocol.routes import MAX_BATCH_ITEMS, MAX_BODY_BYTES
from protocol.sparse_code import AmbiguatedCode, SparseCodeError, disambiguate
from protocol.wire import UploadBatch, UploadItem, encode_batch_binary

EXIT_OK = 0
EXIT_NOTHING = 10
EXIT_INTERRUPTED = 130
ENV_TEST_DELAY = "PRIC_CLIENT_TEST_DELAY_S"
DECODER_FILE = "decoder.onnx"
PROG = "pric-client"

_EPILOG = __doc__[__doc__.index("Exit codes:"):]


class Console:
    """stdout for results, stderr for one-line problems (kept clear of the progress bar)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def say(self, msg: str) -> None:
        # every message is escaped: file names and server text may hold newlines, terminal
        # escapes or bytes that are not UTF-8, and each message must stay one line
        print(printable(msg), file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"{PROG}: {printable(msg)}", file=self.err)

    def error(self, msg: str) -> None:
        print(f"{PROG}: error: {printable(msg)}", file=self.err, flush=True)

    def skip(self, path: str, reason: str) -> None:
        self.warn(f"skipped {path}: {reason}")

    def ask(self, question: str) -> bool | None:
        """A yes/no answer from the terminal; None when stdin is not one (scripts: --yes)."""
        stdin = sys.stdin
        if stdin is None or not stdin.isatty():
            return None
        print(printable(question), end="", file=self.out, flush=True)
        return stdin.readline().strip().lower() in ("y", "yes")

    def progress(self, total: int, desc: str):  # -> tqdm
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="photo", file=self.err, disable=None, leave=False)


# --- configs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class UploadConfig:
    paths: tuple[str, ...]
    labels: str | None = None
    tasks: tuple[str, ...] = ()
    mode: str | None = None
    batch_size: int = 64
    dry_run: bool = False
    save_codes: str | None = None
    workers: int = 1
    faces: str = "all"
    min_face: float = DEFAULT_MIN_FACE

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "UploadConfig":
        if not 1 <= a.batch_size <= MAX_BATCH_ITEMS:
            raise InvalidInputError(f"--batch-size {a.batch_size}: must be between 1 and {MAX_BATCH_ITEMS}")
        return cls(paths=tuple(a.paths), labels=a.labels, tasks=tuple(_split_csv(a.tasks)), mode=a.mode,
                   batch_size=a.batch_size, dry_run=a.dry_run, save_codes=a.save_codes,
                   workers=_workers(a), faces=a.faces, min_face=a.min_face)


@dataclass
class Counts:
    stored: int = 0
    already: int = 0
    skipped: int = 0
    would_send: int = 0
    bytes: int = 0
    item_ids: list[str] = field(default_factory=list)


def _workers(a: argparse.Namespace) -> int:
    if a.workers is None:
        return default_workers()
    if not 1 <= a.workers <= 64:
        raise InvalidInputError(f"--workers {a.workers}: must be between 1 and 64")
    return int(a.workers)


def _split_csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _http(args: argparse.Namespace) -> HttpConfig:
    if args.timeout is not None and not 0 < args.timeout <= 3600:
        raise InvalidInputError(f"--timeout {args.timeout}: must be more than 0 and at most 3600 seconds")
    return HttpConfig.from_env(timeout_s=args.timeout)


def _deadline(args: argparse.Namespace) -> Deadline:
    """The run's deadline: --deadline, else DEFAULT_DEADLINE_S (upload raises it per photo)."""
    seconds = getattr(args, "deadline", None)
    if seconds is None:
        return Deadline(DEFAULT_DEADLINE_S)
    if not 0 < seconds <= 7 * 24 * 3600:  # also refuses nan
        raise InvalidInputError(f"--deadline {seconds}: must be more than 0 and at most a week (604800 s)")
    return Deadline(seconds)


def _api(args: argparse.Namespace, server: str, token: str | None = None,
         config: ParticipantConfig | None = None) -> CollectorAPI:
    """The collector's client; TLS choices from the command line, else from registration."""
    insecure = bool(args.insecure or (config is not None and config.insecure))
    ca_bundle = args.ca_bundle or (config.ca_bundle if config is not None else None)
    return CollectorAPI(server, token, _http(args), _deadline(args), insecure=insecure, ca_bundle=ca_bundle)


def _test_delay() -> None:
    delay = float(os.environ.get(ENV_TEST_DELAY, "0") or 0)
    if delay > 0:
        time.sleep(delay)


# --- register / status / withdraw ------------------------------------------------------
def cmd_register(args: argparse.Namespace, home: Home, con: Console) -> int:
    if home.has_config() and not args.force:
        raise InvalidInputError(f"{home.config_path}: already registered; pass --force to register again")
    api = _api(args, args.server)
    got = api.register()
    ca_bundle = api.session.verify if isinstance(api.session.verify, str) else None
    had_config = home.has_config()
    path = home.save_config(ParticipantConfig(api.server, str(got["participant_id"]), str(got["token"]),
                                              insecure=bool(args.insecure), ca_bundle=ca_bundle))
    if had_config or not home.item_key_path.exists():
        # a new participant gets a new item-id secret: its ids cannot be linked to the last
        # one's; a first registration keeps one that `transform` already made
        home.new_item_key()
    con.say(f"registered as participant {got['participant_id']} at {api.server}; token saved in {path} (mode 0600)")
    if api.server.startswith("http://") and args.insecure:
        con.warn(f"{api.server}: plain http (--insecure): your token and features are not encrypted on the way")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, home: Home, con: Console) -> int:
    config = home.load_config()
    me = _api(args, config.server, config.token, config).me()
    with Journal(home.journal_path, config.server, config.participant_id) as journal:
        local = journal.counts()
    keys = KeyStore(home.keys_path).count() if home.keys_path.exists() else 0
    report = {
        "server": config.server,
        "participant_id": me["participant_id"] or config.participant_id,
        "items": me["items"],
        "items_by_model": me["items_by_model"],
        "journal": local,
        "keys": keys,
    }
    if args.json:
        con.say(json.dumps(report, sort_keys=True))
        return EXIT_OK
    con.say(f"collector {report['server']}: participant {report['participant_id']} has {report['items']} items stored")
    for model_id, n in sorted(report["items_by_model"].items()):
        con.say(f"  {model_id}: {n}")
    con.say(f"local journal: {sum(local.values())} acknowledged uploads"
            + "".join(f"; {m}: {n}" for m, n in sorted(local.items())))
    con.say(f"local key store: {keys} keys")
    return EXIT_OK


def cmd_withdraw(args: argparse.Namespace, home: Home, con: Console) -> int:
    config = home.load_config()
    deleted, revoked = _api(args, config.server, config.token, config).withdraw(keep_token=args.keep_token)
    with Journal(home.journal_path, config.server, config.participant_id) as journal:
        cleared = journal.clear()
    con.say(f"withdrew {deleted} items from {config.server}; local journal cleared ({cleared} entries)")
    if revoked:
        home.config_path.unlink(missing_ok=True)  # the token is dead: keep nothing that looks registered
        con.say("the collector revoked your token; to contribute again, run `pric-client register`")
    return EXIT_OK


# --- upload ------------------------------------------------------------------------------
def _photos_held(home: Home, config: ParticipantConfig, files: Sequence[str | os.PathLike[str]]) -> int:
    """Photos of this participant the collector would hold after this upload: those the
    journal says it acknowledged (under any model) and these, each counted once."""
    with Journal(home.journal_path, config.server, config.participant_id) as journal:
        sent = set(journal.paths())
    return len(sent | {os.fsdecode(os.fspath(f)) for f in files})


class Uploader:
    """Streams photos through the extractor and sends acknowledged-once batches."""

    def __init__(self, cfg: UploadConfig, home: Home, con: Console, api: CollectorAPI,
                 config: ParticipantConfig, card: ModelCard, model_dir: Path) -> None:
        self.cfg, self.home, self.con, self.api, self.card = cfg, home, con, api, card
        self.counts = Counts()
        self.journal = Journal(home.journal_path, config.server, config.participant_id)
        self.keystore = KeyStore(home.keys_path) if card.kind == "sparse_code" else None
        try:
            self.extractor = Extractor(card, model_dir, item_id=self._item_id_function(home.item_key()),
                                       faces=cfg.faces, min_face=cfg.min_face)
        except BaseException:
            self.close()
            raise
        self.labels = read_labels(cfg.labels, cfg.tasks, con.warn) if cfg.labels else {}
        self._seen: set[str] = set()
        self._kept: list[tuple[Path, str, dict[str, np.ndarray]]] = []  # codes from the key store

    def _item_id_function(self, item_key: bytes) -> Callable[[str], str]:
        """photo sha256 → item id: keyed (client.pipeline.item_id_for), except for a photo
        that this participant's journal or key store holds under its old unkeyed id (a
        journal from before ids were keyed): it keeps that id, the one the collector stored
        it under, so it is recognised and not uploaded again."""
        keyed = item_ids(item_key, self.card.sha256)
        model_id, n = self.card.model_id, LEGACY_ITEM_ID_HEX
        if not (self.journal.has_ids_of_length(n, model_id)
                or (self.keystore is not None and self.keystore.has_ids_of_length(n, model_id))):
            return keyed
        journal, keystore, model_sha = self.journal, self.keystore, self.card.sha256

        def item_id(photo_sha256: str) -> str:
            old = legacy_item_id(photo_sha256, model_sha)
            if journal.has(old) or (keystore is not None and keystore.has(old)):
                return old
            return keyed(photo_sha256)

        return item_id

    def close(self) -> None:
        self.journal.close()
        if self.keystore:
            self.keystore.close()

    def skip(self, path: str, reason: str) -> None:
        self.counts.skipped += 1
        self.con.skip(path, reason)

    def _known(self, path: Path, item_id: str) -> bool:
        if item_id in self._seen or self.journal.has(item_id):
            self.counts.already += 1
            if item_id not in self._seen:
                self.counts.item_ids.append(item_id)
            self._seen.add(item_id)
            return True
        self._seen.add(item_id)
        self.counts.item_ids.append(item_id)
        if self.keystore is not None and (got := self.keystore.get(item_id)) is not None:
            # re-send the code already drawn for this photo: its key is the one we kept
            self._kept.append((path, item_id, wire_arrays_of(self.card, None, got[1])))
            if len(self._kept) >= self.cfg.batch_size:
                self._send(self._kept)
                self._kept = []
            return True
        return False

    def run(self, files: list[Path]) -> Counts:
        bar = self.con.progress(len(files), "dry run" if self.cfg.dry_run else "upload")
        try:
            for rows in self.extractor.stream(files, self.cfg.batch_size, self.skip, self._known,
                                              lambda: bar.update(1), self.cfg.workers):
                self._send(self._items(rows))
            if self._kept:
                self._send(self._kept)
                self._kept = []
        finally:
            bar.close()
        return self.counts

    def _items(self, rows) -> list[tuple[Path, str, dict[str, np.ndarray]]]:
        if self.card.kind != "sparse_code":
            return [(r.path, r.item_id, wire_arrays_of(self.card, r.output, None)) for r in rows]
        drawn = [(r, *ambiguate_output(self.card, r.output, self.extractor.decoys)) for r in rows]
        if not self.cfg.dry_run:
            # keys are committed before anything is sent: a stored code always has its key
            assert self.keystore is not None
            self.keystore.put_many((r.item_id, self.card.model_id, code, key) for r, code, key in drawn)
        return [(r.path, r.item_id, wire_arrays_of(self.card, None, code)) for r, code, _ in drawn]

    def _send(self, items: list[tuple[Path, str, dict[str, np.ndarray]]]) -> None:
        batch = UploadBatch(
            model_id=self.card.model_id, model_sha256=self.card.sha256,
            items=[UploadItem(item_id=i, arrays=a, labels=self.labels.get(p.name, {})) for p, i, a in items],
        )
        body = encode_batch_binary(batch)
        if len(body) > MAX_BODY_BYTES:
            if len(items) == 1:
                raise InvalidInputError(f"{items[0][0]}: one item is {len(body)} bytes, above the body limit")
            half = len(items) // 2
            self._send(items[:half])
            self._send(items[half:])
            return
        if self.cfg.dry_run:
            self.counts.would_send += len(items)
            self.counts.bytes += len(body)
            return
        _test_delay()
        answer = self.api.upload(body, self.card.model_id)
        _test_delay()
        self.journal.record((i, self.card.model_id, p) for p, i, _ in items)
        self.counts.stored += answer["stored"]
        self.counts.already += answer["duplicates"]

    def save_codes(self, out: Path) -> int:
        assert self.keystore is not None
        ids, ind, val = [], [], []
        for item_id in self.counts.item_ids:
            got = self.keystore.get(item_id)
            if got is not None:
                ids.append(item_id)
                ind.append(got[1].indices)
                val.append(got[1].values)
        L, kp = self.card.sparse.L, self.card.sparse.k_prime  # type: ignore[union-attr]
        np.savez(
            out, item_ids=np.array(ids, dtype="U64"), model_id=np.array(self.card.model_id),
            indices=np.stack(ind) if ind else np.zeros((0, L, kp), np.uint16),
            values=np.stack(val) if val else np.zeros((0, L, kp), np.float16),
        )
        return len(ids)


def cmd_upload(args: argparse.Namespace, home: Home, con: Console) -> int:
    cfg = UploadConfig.from_args(args)
    config = home.load_config()
    api = _api(args, config.server, config.token, config)
    card, model_dir = fetch_model(api, home)
    expected_mode = "ambiguated" if card.kind == "sparse_code" else "features"
    if cfg.mode and cfg.mode != expected_mode:
        raise InvalidInputError(
            f"--mode {cfg.mode}: the collector's current model {card.model_id} is of kind {card.kind!r}, "
            f"which uploads in {expected_mode} mode"
        )
    if cfg.save_codes and card.kind != "sparse_code":
        raise InvalidInputError("--save-codes: only in ambiguated mode (a sparse_code model)")
    skipped: list[str] = []

    def skip(path: str, reason: str) -> None:
        skipped.append(path)
        con.skip(path, reason)

    files = list(iter_files(cfg.paths, skip))
    if args.deadline is None:  # the default grows with the work to do
        api.deadline.seconds = DEFAULT_DEADLINE_S + UPLOAD_DEADLINE_PER_PHOTO_S * len(files)
    if not files:
        con.say(f"0 stored, 0 already there, {len(skipped)} skipped (errors)")
        return EXIT_NOTHING
    # nothing runs the model or sends anything before this passes; the collector links all of a
    # participant's uploads, so the per-person bound is checked at the photos it would then hold
    approve(home, card, model_dir, api.model_attestations(card.model_id), photos=_photos_held(home, config, files),
            say=con.say,
            ask=con.ask, yes=args.yes, dry_run=cfg.dry_run)
    up = Uploader(cfg, home, con, api, config, card, model_dir)
    up.counts.skipped += len(skipped)
    try:
        counts = up.run(files)
        if cfg.save_codes and not cfg.dry_run:
            n = up.save_codes(Path(cfg.save_codes))
            con.say(f"{n} ambiguated codes written to {cfg.save_codes}")
    finally:
        up.close()
    small = _small_faces(card, up.extractor, cfg.min_face)
    if cfg.dry_run:
        con.say(
            f"dry run: {counts.would_send} items would be sent ({counts.bytes} bytes) to {config.server} "
            f"with model {card.model_id}; {counts.already} already there, {counts.skipped} skipped (errors){small}; "
            "nothing sent"
        )
        return EXIT_OK if counts.would_send + counts.already else EXIT_NOTHING
    con.say(f"{counts.stored} stored, {counts.already} already there, {counts.skipped} skipped (errors){small}")
    return EXIT_OK if counts.stored + counts.already else EXIT_NOTHING


def _small_faces(card: ModelCard, extractor: Extractor, min_face: float) -> str:
    """', N faces below --min-face P px' for a card with alignment (else nothing)."""
    if card.alignment is None:
        return ""
    return f", {extractor.small_faces} faces below --min-face {min_face:g} px"


# --- transform (offline) -----------------------------------------------------------------
def _local_model(args: argparse.Namespace, home: Home, model_id: str | None = None) -> tuple[ModelCard, Path]:
    model_dir = Path(args.model_dir) if args.model_dir else find_cached_model(home, model_id)
    return open_model_dir(model_dir), model_dir


def cmd_transform(args: argparse.Namespace, home: Home, con: Console) -> int:
    card, model_dir = _local_model(args, home)
    if not 1 <= args.batch_size <= 4096:
        raise InvalidInputError(f"--batch-size {args.batch_size}: must be between 1 and 4096")
    skipped = 0

    def skip(path: str, reason: str) -> None:
        nonlocal skipped
        skipped += 1
        con.skip(path, reason)

    files = list(iter_files(args.paths, skip))
    if not args.model_dir:
        # a model a collector sent: the same checks as upload, offline, against the
        # attestations kept beside it when it was verified (a --model-dir is your own file)
        approve(home, card, model_dir, load_envelopes(model_dir), photos=len(files), say=con.say, ask=con.ask,
                yes=args.yes, store=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extractor = Extractor(card, model_dir, item_id=item_ids(home.item_key(), card.sha256), faces=args.faces,
                          min_face=args.min_face)
    names: list[str] = []
    ids: list[str] = []
    face_index: list[int] = []
    fd, tmp = tempfile.mkstemp(prefix=".pric-transform-", dir=out.parent)
    os.close(fd)
    writer = NpyStreamWriter(Path(tmp), extractor.out_shape, card.output.dtype)
    bar = con.progress(len(files), "transform")
    try:
        for rows in extractor.stream(files, args.batch_size, skip, tick=lambda: bar.update(1), workers=_workers(args)):
            writer.append(np.stack([r.output for r in rows]))
            names.extend(str(r.path) for r in rows)
            ids.extend(r.item_id for r in rows)
            face_index.extend(-1 if r.face is None else r.face for r in rows)
        bar.close()
        small = _small_faces(card, extractor, args.min_face)
        if not names:
            writer.discard()
            con.say(f"0 photos transformed, {skipped} skipped (errors){small}; nothing written")
            return EXIT_NOTHING
        part = out.with_name(out.name + ".part")
        with zipfile.ZipFile(part, "w", allowZip64=True) as zf:
            writer.write_member(zf, "features")
            write_npz_member(zf, "file_names", np.array(names))
            write_npz_member(zf, "item_ids", np.array(ids))
            write_npz_member(zf, "model_id", np.array(card.model_id))
            if card.alignment is not None:  # which face of its photo each row is (0: the largest)
                write_npz_member(zf, "face_index", np.array(face_index, dtype=np.int32))
        part.replace(out)
    except BaseException:
        bar.close()
        writer.discard()
        raise
    what = "faces" if card.alignment is not None else "photos"
    con.say(f"{len(names)} {what} transformed with {card.model_id}, {skipped} skipped (errors){small}; written to {out}")
    return EXIT_OK


# --- page-key: this registration for the participant's page -----------------------------
# the file's format tag; the page (collector/webapp/js/main.js) accepts exactly this one
PAGE_KEY_FORMAT = "pric-page-key/1"


def cmd_page_key(args: argparse.Namespace, home: Home, con: Console) -> int:
    """Write this registration and its item-id secret to a file (mode 0600) that the
    participant's page imports, so the page uploads as this participant with the ids this
    client computes: the same photo gets the same id from both and is stored once. The
    secret goes from this device to the participant's browser only; the collector never
    sees it (the page checks the file names the collector that serves it before it sends
    the token anywhere)."""
    config = home.load_config()
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InvalidInputError(f"{out}: already exists; pass --force to replace it")
    doc = {"format": PAGE_KEY_FORMAT, "server": config.server, "participant_id": config.participant_id,
           "token": config.token, "item_key": home.item_key().hex()}
    from client.home import write_private

    write_private(out, (json.dumps(doc, indent=1) + "\n").encode())
    con.say(f"registration of participant {config.participant_id} at {config.server} and its item-id secret written "
            f"to {out} (mode 0600): choose it in the page ({config.server}/app/) under \"Join\"; whoever holds "
            "this file can upload and withdraw as you: delete it once imported")
    return EXIT_OK


# --- keys and decode (authorised data user) ------------------------------------------
def cmd_keys_export(args: argparse.Namespace, home: Home, con: Console) -> int:
    if not home.keys_path.exists():
        raise InvalidInputError(f"{home.keys_path}: no key store (nothing uploaded in ambiguated mode)")
    with KeyStore(home.keys_path) as store:
        n = store.export(args.out, args.items or None, args.model)
    con.say(f"{n} keys written to {args.out} (mode 0600)")
    return EXIT_OK if n else EXIT_NOTHING


def _read_codes(path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            model_id = str(z["model_id"])
            ids = [str(i) for i in z["item_ids"]]
            ind, val = z["indices"], z["values"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{path}: not a codes file (npz with model_id, item_ids, indices, values): {exc}") from None
    if ind.ndim != 3 or ind.shape != val.shape or ind.shape[0] != len(ids):
        raise InvalidInputError(f"{path}: indices {ind.shape} / values {val.shape} / {len(ids)} item ids disagree")
    return model_id, ids, ind, val


def cmd_decode(args: argparse.Namespace, home: Home, con: Console) -> int:
    codes_path = Path(args.codes)
    model_id, ids, ind, val = _read_codes(codes_path)
    keys = read_key_file(args.key_file)
    card, model_dir = _local_model(args, home, model_id)
    if card.kind != "sparse_code" or card.sparse is None:
        raise InvalidInputError(f"{model_dir}: model {card.model_id} is not a sparse_code model")
    if card.model_id != model_id:
        raise InvalidInputError(f"{codes_path}: codes are of model {model_id}, the model given is {card.model_id}")
    if DECODER_FILE not in card.extra_files:
        raise ModelIntegrityError(f"{model_dir}: model {card.model_id} ships no {DECODER_FILE}")
    decoder = OnnxModel(model_dir / DECODER_FILE, "code", "image")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    refused = bad_ids = 0
    ready: list[tuple[str, np.ndarray]] = []
    for n, item_id in enumerate(ids):
        if not _safe_output_name(out, item_id):
            # the codes file is input like any other: its ids name files only inside --out
            bad_ids += 1
            con.warn(f"refused item {item_id}: its id cannot be a file name in {out} "
                     "(1-64 letters, digits, '_', '.', '-', not starting with '.')")
            continue
        try:
            if item_id not in keys:
                raise KeyMismatchError("no key for this item in the key file")
            code = AmbiguatedCode(indices=ind[n].astype(np.uint16), values=val[n].astype(np.float16))
            ready.append((item_id, disambiguate(code, keys[item_id], card.sparse.m)))
        except (KeyMismatchError, SparseCodeError) as exc:
            refused += 1
            con.warn(f"refused item {item_id}: {exc.message}")
    written = 0
    for start in range(0, len(ready), args.batch_size):
        chunk = ready[start:start + args.batch_size]
        images = decoder(np.stack([c for _, c in chunk]).astype(np.float32))
        for (item_id, _), img in zip(chunk, images):
            pixels = (np.clip(np.moveaxis(img, 0, -1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            from PIL import Image

            Image.fromarray(pixels, "RGB").save(out / f"{item_id}.png")
            written += 1
    con.say(f"{written} images written to {out}, {refused + bad_ids} refused")
    if refused:
        return KeyMismatchError.exit_code
    if bad_ids:
        return InvalidInputError.exit_code
    return EXIT_OK if written else EXIT_NOTHING


_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def _safe_output_name(out: Path, item_id: str) -> bool:
    """`<item_id>.png` is a plain file name that stays inside `out` (no separator, no
    `..`, no absolute path, no control character); checked twice, by pattern and by path."""
    if not _OUTPUT_NAME.fullmatch(item_id):
        return False
    return (out / f"{item_id}.png").resolve().parent == out.resolve()


# --- trust store and policy ----------------------------------------------------------------
def cmd_trust_add(args: argparse.Namespace, home: Home, con: Console) -> int:
    key = TrustStore(home).add(args.file)
    con.say(f"trusting auditor key {key.keyid} ({key.name or 'unnamed'})")
    return EXIT_OK


def cmd_trust_list(args: argparse.Namespace, home: Home, con: Console) -> int:
    store = TrustStore(home)
    entries = store.entries()
    for e in entries:
        how = ", ".join(w for w, on in (("default", e.default), ("added", e.added)) if on)
        con.say(f"{e.key.keyid}  {e.key.name or '(unnamed)'}  [{how}]")
    if not entries:
        con.say("no trusted auditor key: every model will be refused; add one with `pric-client trust add FILE`")
    removed = sorted(store.removed())
    if removed:
        con.say(f"removed default keys: {', '.join(k[:16] for k in removed)}")
    return EXIT_OK


def cmd_trust_remove(args: argparse.Namespace, home: Home, con: Console) -> int:
    e = TrustStore(home).remove(args.keyid)
    con.say(f"no longer trusting auditor key {e.key.keyid} ({e.key.name or 'unnamed'})"
            + ("; a default key: remembered as removed" if e.default else ""))
    return EXIT_OK


def _show_policy(policy: Policy, con: Console) -> None:
    defaults = Policy()
    for name, text in POLICY_HELP.items():
        con.say(f"{name} = {getattr(policy, name):g} (default {getattr(defaults, name):g}): {text}")


def cmd_policy_show(args: argparse.Namespace, home: Home, con: Console) -> int:
    _show_policy(Policy.load(home), con)
    return EXIT_OK


def cmd_policy_set(args: argparse.Namespace, home: Home, con: Console) -> int:
    policy = Policy.load(home).tightened(args.key, args.value)
    path = policy.save(home)
    con.say(f"{args.key} = {getattr(policy, args.key):g} (saved in {path})")
    return EXIT_OK


def cmd_policy_reset(args: argparse.Namespace, home: Home, con: Console) -> int:
    home.policy_path.unlink(missing_ok=True)
    _show_policy(Policy(), con)
    return EXIT_OK


# --- argument parsing --------------------------------------------------------------------
def _face_options(s: argparse.ArgumentParser) -> None:
    """--faces and --min-face: used by a model whose card has an alignment section."""
    s.add_argument("--faces", choices=FACE_CHOICES, default="all",
                   help="a model that finds faces (its card has alignment): one item per face found (all, the "
                        "default) or only the largest; a photo without a face is skipped with one line")
    s.add_argument("--min-face", type=float, default=DEFAULT_MIN_FACE, metavar="PX",
                   help=f"faces whose box is smaller than PX photo pixels are left out and counted (default "
                        f"{DEFAULT_MIN_FACE})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="PRIC participant client: transform photos on this device, upload only features.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--home", default=None, help="client folder (default: $PRIC_CLIENT_HOME or the per-user config folder)")
    p.add_argument("--timeout", type=float, default=None, help="seconds a network read or connect may wait (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--deadline", type=float, metavar="SECONDS",
                     help=f"end the whole run when it takes longer (default {DEFAULT_DEADLINE_S:.0f} s; upload: "
                          f"{DEFAULT_DEADLINE_S:.0f} s + {UPLOAD_DEADLINE_PER_PHOTO_S:.0f} s per photo); exit 11")
    net.add_argument("--ca-bundle", metavar="FILE",
                     help="PEM file with the CA certificate(s) of a collector whose TLS certificate is from a private "
                          "CA; certificates are always verified (register remembers it)")
    net.add_argument("--insecure", action="store_true",
                     help="allow plain http:// to a host that is not this machine: token and features travel "
                          "unencrypted (register remembers it)")

    s = sub.add_parser("register", parents=[net], help="register with a collector and keep the token (mode 0600)")
    s.add_argument("--server", required=True, help="collector URL: https://HOST[:PORT] (http:// only to this machine "
                   "without --insecure)")
    s.add_argument("--force", action="store_true", help="replace an existing registration")
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("upload", parents=[net], help="transform photos on device and upload the results")
    s.add_argument("paths", nargs="+", metavar="PATH", help="photo files or folders (recursive)")
    s.add_argument("--labels", help="CSV: filename,<task1>,... with 0/1 (or -1/1)")
    s.add_argument("--tasks", help="comma-separated label columns to send (default: every 0/1 column)")
    s.add_argument("--mode", choices=("features", "ambiguated"), help="must match the collector's model kind (default: from its card)")
    s.add_argument("--batch-size", type=int, default=64, help=f"photos per upload request (1..{MAX_BATCH_ITEMS})")
    s.add_argument("--dry-run", action="store_true", help="show counts, bytes and model; send nothing")
    s.add_argument("--save-codes", metavar="FILE", help="ambiguated mode: also write the uploaded codes to FILE.npz")
    _face_options(s)
    s.add_argument("--yes", action="store_true", help="consent to a verified model that passes your policy without "
                   "being asked (scripts); the attestation and policy checks still apply")
    s.add_argument("--workers", type=int, help="threads working on photos: 1 does all; N > 1: this one reads, "
                   "a model thread runs the model, N-1 threads decode photos over 6 KiB (default: CPU cores, at most 4)")
    s.set_defaults(func=cmd_upload)

    s = sub.add_parser("transform", help="offline: write features of photos to an .npz")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--out", required=True, help="output .npz (features, file_names, item_ids, model_id; face_index "
                   "for a model with alignment)")
    _face_options(s)
    s.add_argument("--model-dir", help="folder with model_card.json + model (default: the cached model, which is "
                   "checked like upload does; a folder you give is used as it is)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--yes", action="store_true", help="consent to the cached model without being asked")
    s.add_argument("--workers", type=int, help="threads working on photos: 1 does all; N > 1: this one reads, "
                   "a model thread runs the model, N-1 threads decode photos over 6 KiB (default: CPU cores, at most 4)")
    s.set_defaults(func=cmd_transform)

    s = sub.add_parser("status", parents=[net], help="what the collector holds for you, and local counts")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("withdraw", parents=[net], help="delete all your items on the collector and clear the journal; "
                       "the collector also revokes your token unless --keep-token")
    s.add_argument("--keep-token", action="store_true", help="stay registered (the token keeps working)")
    s.set_defaults(func=cmd_withdraw)

    s = sub.add_parser("page-key", help="write this registration and its item-id secret for the participant's page "
                       "(JSON, mode 0600), so the page and this client give a photo the same item id")
    s.add_argument("--out", required=True, help="the file to write (imported in the page's Join step)")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.set_defaults(func=cmd_page_key)

    keys = sub.add_parser("keys", help="ambiguation keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    s = ksub.add_parser("export", help="write keys for a recipient (JSON, mode 0600)")
    s.add_argument("--out", required=True)
    s.add_argument("--items", nargs="+", metavar="ITEM_ID", help="only these items (default: all)")
    s.add_argument("--model", help="only keys of this model id")
    s.set_defaults(func=cmd_keys_export)

    s = sub.add_parser("decode", help="authorised data user: decode ambiguated codes with their keys to PNGs")
    s.add_argument("--key-file", required=True)
    s.add_argument("--codes", required=True, help=".npz with model_id, item_ids, indices, values")
    s.add_argument("--out", required=True, help="folder for <item_id>.png (an id that is not a plain file name "
                   "is refused, exit 2)")
    s.add_argument("--model-dir", help="folder with the sparse model and decoder.onnx (default: cached)")
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(func=cmd_decode)

    trust = sub.add_parser("trust", help="auditor keys whose attestations you accept")
    tsub = trust.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    s = tsub.add_parser("add", help="trust an auditor's public key file (JSON: keyid, name, public_key)")
    s.add_argument("file")
    s.set_defaults(func=cmd_trust_add)
    s = tsub.add_parser("list", help="trusted keys: the shipped default and the ones you added")
    s.set_defaults(func=cmd_trust_list)
    s = tsub.add_parser("remove", help="stop trusting a key (a unique prefix of its id; a default key too)")
    s.add_argument("keyid")
    s.set_defaults(func=cmd_trust_remove)

    pol = sub.add_parser("policy", help="your bounds on what an attested model may leak")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    s = psub.add_parser("show", help="the bounds, their defaults and meaning")
    s.set_defaults(func=cmd_policy_show)
    s = psub.add_parser("set", help="tighten one bound (a looser value is refused, exit 13)")
    s.add_argument("key", choices=list(POLICY_HELP))
    s.add_argument("value")
    s.set_defaults(func=cmd_policy_set)
    s = psub.add_parser("reset", help="back to the defaults")
    s.set_defaults(func=cmd_policy_reset)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    con = Console(out, err)
    home = Home(args.home) if args.home else Home(default_home())
    try:
        return int(args.func(args, home, con))
    except PricError as exc:
        con.error(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=con.err, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
