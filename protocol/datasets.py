"""Face datasets for training and audits.

Two layouts are read:

* CelebA (official files, e.g. ../shared/data/celeba-10k unchanged):
  `images/`, `list_attr_celeba.txt` (-1/+1), `list_eval_partition.txt`, optional
  `identity_CelebA.txt`.
* generic: `images/` + `labels.csv` with a `filename` column, one 0/1 (or -1/1) column per
  attribute, and optional `split` (0 train, 1 val, 2 test) and `identity` columns; an
  optional `dataset.json` beside it may state the photos' framing (`{"crop_box": [l, t, r, b]}`).

Either can take a split file (`filename split` per line) that overrides the split. Where the
data has no split (no `split` column, no `list_eval_partition.txt`), every tool derives the
same one here (`derive_split`): 80/10/10 by a hash of the identity where identities are
given (identity-disjoint), else of the file name. The labels are checked before any photo
is decoded: non-binary columns, duplicate or missing files and unknown split values fail
with one line naming the file, row and column.
Photos go through protocol.preprocess (the same code the client runs), and the prepared
uint8 pixels are cached on disk so a second run does not decode 10,000 JPEGs again. With an
alignment (protocol.align, a model card's section), each photo's face (the one nearest the
centre) is found and aligned first, as the client does; a photo where none is found or it
cannot be aligned is left out with one line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from protocol.errors import ImageError, InvalidInputError
from protocol.model_card import InputSpec
from protocol.preprocess import load_image, prepare

if TYPE_CHECKING:
    from protocol.align import Aligner

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}
SPLIT_LABELS = {TRAIN: "train", VAL: "val", TEST: "test"}
# the derived split's fractions (train, val, test) when the data brings none
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# CelebA's aligned 178x218 photos: the face box the shipped models were trained on
CELEBA_CROP_BOX = (0.0, 20 / 218, 1.0, 198 / 218)
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
DATASET_JSON = "dataset.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """$PRIC_DATA, else ../shared/data/celeba-10k beside the checkout."""
    env = os.environ.get("PRIC_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "celeba-10k"


def default_cache_dir() -> Path:
    env = os.environ.get("PRIC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pric"


@dataclass
class FaceData:
    """Prepared photos with labels.

    pixels: uint8 (N, H, W, 3); labels: uint8 (N, A) in {0, 1}; identities: int64 (N,)
    (-1 where unknown); splits: int8 (N,).
    """

    pixels: np.ndarray
    labels: np.ndarray
    attr_names: list[str]
    identities: np.ndarray
    filenames: list[str]
    splits: np.ndarray
    root: Path
    # where the split came from ("labels.csv split column", "derived: ...", a split file)
    split_source: str = ""

    def __len__(self) -> int:
        return len(self.filenames)

    def attr_index(self, name: str) -> int:
        if name not in self.attr_names:
            raise InvalidInputError(
                f"unknown attribute {name!r} in {self.root}; valid names: {', '.join(self.attr_names)}"
            )
        return self.attr_names.index(name)

    def attr(self, name: str) -> np.ndarray:
        """(N,) int64 labels of one attribute."""
        return self.labels[:, self.attr_index(name)].astype(np.int64)

    def subset(self, split: int | str) -> "FaceData":
        s = SPLIT_NAMES[split] if isinstance(split, str) else split
        return self.select(np.flatnonzero(self.splits == s))

    def select(self, idx: np.ndarray) -> "FaceData":
        return FaceData(
            pixels=self.pixels[idx], labels=self.labels[idx], attr_names=self.attr_names,
            identities=self.identities[idx], filenames=[self.filenames[i] for i in idx],
            splits=self.splits[idx], root=self.root, split_source=self.split_source,
        )

    def split_sizes(self) -> tuple[int, int, int]:
        return tuple(int((self.splits == k).sum()) for k in (TRAIN, VAL, TEST))  # type: ignore[return-value]

    def split_summary(self) -> str:
        """One line: 'split: train 8012 / val 1003 / test 985 (derived: ...)'."""
        tr, va, te = self.split_sizes()
        left = len(self) - tr - va - te
        extra = f", {left} photo(s) in no split" if left else ""
        return f"split: train {tr} / val {va} / test {te}{extra} ({self.split_source or 'unknown source'})"

    def write_split(self, path: str | Path) -> Path:
        """The split as a split file ('filename split' per line), which --split-file reads back."""
        path = Path(path)
        lines = [f"{f} {int(s)}" for f, s in zip(self.filenames, self.splits) if s in (TRAIN, VAL, TEST)]
        path.write_text("\n".join(lines) + ("\n" if lines else ""))
        return path


@dataclass(frozen=True)
class _Index:
    filenames: list[str]
    labels: np.ndarray
    attr_names: list[str]
    identities: np.ndarray
    splits: np.ndarray | None  # None: the data brings no split
    source: str  # the labels file, for messages
    id_keys: list[str]  # identity as written ("" unknown): what the derived split hashes
    split_source: str = ""


def _read_split_file(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise InvalidInputError(f"{path}: split file not found")
    out: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise InvalidInputError(f"{path}:{n}: expected 'filename split' with split 0, 1 or 2")
        if parts[0] in out:
            raise InvalidInputError(f"{path}:{n}: duplicate file name {parts[0]!r}")
        out[parts[0]] = int(parts[1])
    return out


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for `key` (sha256: the same on every machine and version)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def derive_split(filenames: Sequence[str], id_keys: Sequence[str] | None = None,
                 fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> np.ndarray:
    """The deterministic split of data that brings none: int8 (N,) of TRAIN/VAL/TEST.

    Each row falls by a hash of its identity where one is given (so every photo of a person
    lands in the same split: identity-disjoint), else of its file name. A hash, not a
    shuffle, so a row's split does not change when photos are added or removed, and every
    tool (pric-train, pric-export, pric-audit) derives the same split from the same folder."""
    ids = list(id_keys) if id_keys is not None else [""] * len(filenames)
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    out = np.empty(len(filenames), np.int8)
    for i, (f, ident) in enumerate(zip(filenames, ids)):
        h = _unit_hash(f"identity:{ident}" if ident else f"file:{f}")
        out[i] = TRAIN if h < cut_train else VAL if h < cut_val else TEST
    return out


def default_crop_box(root: str | Path | None = None) -> tuple[float, float, float, float]:
    """The framing a data set's photos get unless --crop-box says otherwise: CelebA's face box
    for the CelebA layout, `crop_box` of the folder's dataset.json for the generic layout, else
    the whole image (a crop tuned to one data set's framing cuts faces out of another's)."""
    root = Path(root) if root is not None else default_data_dir()
    if (root / "list_attr_celeba.txt").is_file():
        return CELEBA_CROP_BOX
    meta = root / DATASET_JSON
    if meta.is_file():
        try:
            box = json.loads(meta.read_text()).get("crop_box")
        except (ValueError, AttributeError):
            raise InvalidInputError(f"{meta}: not a JSON object") from None
        if box is not None:
            return parse_crop_box(box, str(meta))
    return WHOLE_IMAGE


def parse_crop_box(value: str | Sequence[float], what: str = "--crop-box") -> tuple[float, float, float, float]:
    """'l,t,r,b' (relative, 0<=l<r<=1, 0<=t<b<=1) or a 4-sequence -> a crop box."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        box = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise InvalidInputError(f"{what}: expected 4 numbers left,top,right,bottom (relative), got {value!r}")
    l, t, r, b = box
    if not (0 <= l < r <= 1 and 0 <= t < b <= 1):
        raise InvalidInputError(f"{what}: {value!r} must satisfy 0<=left<right<=1 and 0<=top<bottom<=1")
    return box  # type: ignore[return-value]


def _index_celeba(root: Path) -> _Index:
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    attr_names = lines[1].split()
    files, rows = [], []
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(attr_names) + 1:
            raise InvalidInputError(f"{root / 'list_attr_celeba.txt'}:{n}: expected {len(attr_names) + 1} fields")
        files.append(parts[0])
        rows.append([1 if v == "1" else 0 for v in parts[1:]])
    part_file = root / "list_eval_partition.txt"
    parts_map = _read_split_file(part_file) if part_file.is_file() else {}
    ident_file = root / "identity_CelebA.txt"
    ident = dict(l.split() for l in ident_file.read_text().splitlines() if l.strip()) if ident_file.is_file() else {}
    _check_duplicates(files, root / "list_attr_celeba.txt", first_row=3)
    return _Index(
        filenames=files,
        labels=np.asarray(rows, dtype=np.uint8),
        attr_names=attr_names,
        identities=np.asarray([int(ident.get(f, -1)) for f in files], dtype=np.int64),
        # a file missing from the partition is in no split (-1), never silently in train
        splits=np.asarray([parts_map.get(f, -1) for f in files], dtype=np.int8) if parts_map else None,
        source=str(root / "list_attr_celeba.txt"),
        id_keys=[ident.get(f, "") for f in files],
        split_source=part_file.name if parts_map else "",
    )


def _check_duplicates(files: Sequence[str], path: Path, first_row: int) -> None:
    seen: dict[str, int] = {}
    for n, f in enumerate(files, first_row):
        if f in seen:
            raise InvalidInputError(f"{path}:{n}: duplicate file name {f!r} (first at row {seen[f]})")
        seen[f] = n


_SPLIT_VALUES = {"0": TRAIN, "1": VAL, "2": TEST, "train": TRAIN, "val": VAL, "test": TEST}


def _index_generic(root: Path) -> _Index:
    path = root / "labels.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise InvalidInputError(f"{path}: needs a 'filename' column")
        names = [c.strip() for c in reader.fieldnames]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise InvalidInputError(f"{path}: column {dup[0]!r} appears more than once")
        has_split, has_identity = "split" in names, "identity" in names
        attr_names = [c for c in reader.fieldnames if c not in ("filename", "split", "identity")]
        files, rows, id_keys, splits = [], [], [], []
        seen_neg: dict[str, int] = {}  # column -> first row with -1
        seen_zero: dict[str, int] = {}  # column -> first row with 0
        for n, row in enumerate(reader, 2):
            if None in row or any(v is None for v in row.values()):
                raise InvalidInputError(f"{path}:{n}: expected {len(names)} fields")
            name = row["filename"].strip()
            if not name:
                raise InvalidInputError(f"{path}:{n}: empty file name")
            files.append(name)
            values = []
            for a in attr_names:
                v = row[a].strip()
                if v not in ("0", "1", "-1"):
                    raise InvalidInputError(
                        f"{path}:{n}: column {a!r} has value {v!r}; attribute columns must be binary (0/1 or -1/1)")
                (seen_neg if v == "-1" else seen_zero if v == "0" else {}).setdefault(a, n)
                values.append(1 if v == "1" else 0)
            rows.append(values)
            if has_split:
                v = row["split"].strip().lower()
                if v not in _SPLIT_VALUES:
                    raise InvalidInputError(f"{path}:{n}: column 'split' has value {row['split']!r}; expected 0 "
                                            "(train), 1 (val) or 2 (test)")
                splits.append(_SPLIT_VALUES[v])
            id_keys.append(row["identity"].strip() if has_identity else "")
    for a in attr_names:
        if a in seen_neg and a in seen_zero:
            raise InvalidInputError(f"{path}:{max(seen_neg[a], seen_zero[a])}: column {a!r} mixes -1 and 0; a "
                                    "binary column is 0/1 or -1/1")
    _check_duplicates(files, path, first_row=2)
    # identities: integers as written, other names numbered in order of appearance
    numbers: dict[str, int] = {}
    ids = []
    for k in id_keys:
        if not k:
            ids.append(-1)
        elif k.lstrip("-").isdigit():
            ids.append(int(k))
        else:
            ids.append(numbers.setdefault(k, len(numbers)))
    if numbers and any(k.lstrip("-").isdigit() for k in id_keys if k):
        raise InvalidInputError(f"{path}: column 'identity' mixes numbers and names; use one kind")
    return _Index(files, np.asarray(rows, dtype=np.uint8).reshape(len(files), len(attr_names)), attr_names,
                  np.asarray(ids, dtype=np.int64), np.asarray(splits, dtype=np.int8) if has_split else None,
                  source=str(path), id_keys=id_keys, split_source="labels.csv split column" if has_split else "")


def _check_files(root: Path, index: _Index, keep: np.ndarray) -> None:
    """Every labelled photo must exist: a wrong folder or a half-copied one fails before any
    decoding or training, naming the first missing file and its row."""
    images = root / "images"
    missing = [i for i in keep if not (images / index.filenames[i]).is_file()]
    if missing:
        first = index.filenames[missing[0]]
        raise InvalidInputError(
            f"{index.source}: {len(missing)} labelled photo(s) missing from {images}, the first {first!r} "
            f"(row {missing[0] + (2 if index.source.endswith('.csv') else 3)})")


def check_class_counts(data: FaceData, names: Sequence[str], split: int | str, minimum: int) -> None:
    """InvalidInputError (one line naming attribute, class and split) when a split holds fewer
    than `minimum` photos of either class of an attribute: a model or an attacker cannot
    learn, or be judged on, a class it (almost) never sees."""
    s = SPLIT_NAMES[split] if isinstance(split, str) else split
    sel = data.splits == s
    for name in names:
        y = data.attr(name)[sel]
        counts = (int((y == 0).sum()), int((y == 1).sum()))
        for cls, c in enumerate(counts):
            if c < minimum:
                raise InvalidInputError(
                    f"{data.root}: attribute {name!r} has {c} photo(s) of class {cls} in the {SPLIT_LABELS[s]} split "
                    f"(need at least {minimum}; class counts {list(counts)} of {int(sel.sum())} photos)")


# the modules whose code decides a prepared photo's pixels (a cache key covers them):
# decoding and resizing; for aligned photos also the detector's processing and the warp
PROTOCOL_DIR = Path(__file__).resolve().parent
PREPARING_CODE = ("preprocess.py", "align.py", "faces.py")


def _cache_key(root: Path, spec: InputSpec, files: Sequence[str], aligner: "Aligner | None" = None) -> str:
    h = hashlib.sha256()
    h.update(str(root.resolve()).encode())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update("\n".join(files).encode())
    # the photos as they are now: a folder written again under the same names (a data set
    # made afresh by a command) is prepared again, not read from the last one's cache
    for f in files:
        st = (root / "images" / f).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    # the code that prepares them: a change to decoding, detection or alignment (a pyramid
    # made another way) prepares the photos again, so an audit reads what a device sends
    for module in PREPARING_CODE if aligner is not None else PREPARING_CODE[:1]:
        h.update((PROTOCOL_DIR / module).read_bytes())
    if aligner is not None:
        h.update(json.dumps(aligner.spec.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:24]


def _prepare_all(root: Path, files: Sequence[str], spec: InputSpec, progress: bool,
                 aligner: "Aligner | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and prepare every photo; returns pixels (N, H, W, 3) and an ok-mask (N,)."""
    out = np.zeros((len(files), spec.height, spec.width, 3), dtype=np.uint8)
    ok = np.ones(len(files), dtype=bool)

    def work(i: int) -> None:
        try:
            if aligner is not None:
                out[i] = prepare(aligner.centre_face(load_image(root / "images" / files[i]), files[i]), spec)
                return
            out[i] = prepare(load_image(root / "images" / files[i], spec), spec)
        except ImageError as exc:
            ok[i] = False
            print(f"skipped: {exc}", file=sys.stderr, flush=True)  # stdout may be a command's JSON

    iterator = range(len(files))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = pool.map(work, iterator)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(files), desc=f"decoding {root.name}", unit="img", leave=False,
                           disable=None)  # hidden when stderr is not a terminal
        for _ in results:
            pass
    return out, ok


def load_faces(
    root: str | Path | None = None,
    spec: InputSpec | None = None,
    split_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    announce: bool = True,
    aligner: "Aligner | None" = None,
) -> FaceData:
    """Load a face folder in either layout, prepared with `spec` (default InputSpec()),
    with `aligner` each photo's centre face aligned first (protocol.align).

    A derived split is printed in one line unless `announce` is False (callers that load a
    few photos for a parity check, or print the split themselves)."""
    root = Path(root) if root is not None else default_data_dir()
    spec = spec or InputSpec()
    if (root / "list_attr_celeba.txt").is_file():
        index = _index_celeba(root)
    elif (root / "labels.csv").is_file():
        index = _index_generic(root)
    else:
        raise InvalidInputError(
            f"{root}: not a dataset folder (expected list_attr_celeba.txt or labels.csv beside images/)"
        )
    if not (root / "images").is_dir():
        raise InvalidInputError(f"{root}: has no images/ folder")
    if split_file is not None:
        mapping = _read_split_file(Path(split_file))
        splits = np.asarray([mapping.get(f, -1) for f in index.filenames], dtype=np.int8)
        source = f"split file {Path(split_file).name}"
    elif index.splits is not None:
        splits, source = index.splits, index.split_source
    else:
        splits = derive_split(index.filenames, index.id_keys)
        by_id = any(index.id_keys)
        source = (f"derived {round(SPLIT_FRACTIONS[0] * 100)}/{round(SPLIT_FRACTIONS[1] * 100)}/"
                  f"{round(SPLIT_FRACTIONS[2] * 100)} by a hash of the "
                  + ("identity (identity-disjoint)" if by_id else "file name (no identity column)")
                  + f": {Path(index.source).name} has no split")
    files = index.filenames
    keep = np.arange(len(files))
    if limit is not None and limit < len(files):
        # keep the split proportions: the first `limit` files in order, which for CelebA
        # interleave identities across splits
        keep = keep[:limit]
    _check_files(root, index, keep)
    files = [files[i] for i in keep]

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(root, spec, files, aligner)
    pix_path, ok_path = cache / f"faces-{key}.npy", cache / f"faces-{key}.ok.npy"
    if pix_path.is_file() and ok_path.is_file():
        pixels = np.load(pix_path, allow_pickle=False)
        ok = np.load(ok_path, allow_pickle=False)
    else:
        pixels, ok = _prepare_all(root, files, spec, progress, aligner)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = pix_path.with_suffix(".tmp.npy")
            np.save(tmp, pixels, allow_pickle=False)
            np.save(ok_path, ok, allow_pickle=False)
            os.replace(tmp, pix_path)
        except OSError:
            pass  # a read-only cache only costs time
    sel = keep[ok]
    data = FaceData(
        pixels=pixels[ok], labels=index.labels[sel], attr_names=index.attr_names,
        identities=index.identities[sel], filenames=[files[i] for i in np.flatnonzero(ok)],
        splits=splits[sel], root=root, split_source=source,
    )
    if announce and index.splits is None and split_file is None:
        # every tool reading this folder says so, in the same words and with the same sizes
        print(data.split_summary(), flush=True)
    return data
