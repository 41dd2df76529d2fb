"""Face datasets for training and audits.

Two layouts are read:

* CelebA (official files, e.g. ../shared/data/celeba-10k unchanged):
  `images/`, `list_attr_celeba.txt` (-1/+1), `list_eval_partition.txt`, optional
  `identity_CelebA.txt`.
* generic: `images/` + `labels.csv` with a `filename` column, one 0/1 (or -1/1) column per
  attribute, and optional `split` (0 train, 1 val, 2 test) and `identity` columns.

Either can take a split file (`filename split` per line) that overrides the split.
Photos go through protocol.preprocess (the same code the client runs), and the prepared
uint8 pixels are cached on disk so a second run does not decode 10,000 JPEGs again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from protocol.errors import ImageError, InvalidInputError
from protocol.model_card import InputSpec
from protocol.preprocess import load_image, prepare

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}
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
            splits=self.splits[idx], root=self.root,
        )


@dataclass(frozen=True)
class _Index:
    filenames: list[str]
    labels: np.ndarray
    attr_names: list[str]
    identities: np.ndarray
    splits: np.ndarray


def _read_split_file(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise InvalidInputError(f"{path}:{n}: expected 'filename split' with split 0, 1 or 2")
        out[parts[0]] = int(parts[1])
    return out


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
    return _Index(
        filenames=files,
        labels=np.asarray(rows, dtype=np.uint8),
        attr_names=attr_names,
        identities=np.asarray([int(ident.get(f, -1)) for f in files], dtype=np.int64),
        splits=np.asarray([parts_map.get(f, TRAIN) for f in files], dtype=np.int8),
    )


def _index_generic(root: Path) -> _Index:
    path = root / "labels.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise InvalidInputError(f"{path}: needs a 'filename' column")
        attr_names = [c for c in reader.fieldnames if c not in ("filename", "split", "identity")]
        files, rows, ids, splits = [], [], [], []
        for n, row in enumerate(reader, 2):
            files.append(row["filename"])
            try:
                rows.append([1 if int(row[a]) == 1 else 0 for a in attr_names])
                ids.append(int(row.get("identity") or -1))
                splits.append(int(row.get("split") or TRAIN))
            except (TypeError, ValueError):
                raise InvalidInputError(f"{path}:{n}: labels must be 0/1 or -1/1 integers") from None
    return _Index(files, np.asarray(rows, dtype=np.uint8).reshape(len(files), len(attr_names)), attr_names,
                  np.asarray(ids, dtype=np.int64), np.asarray(splits, dtype=np.int8))


def _cache_key(root: Path, spec: InputSpec, files: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(str(root.resolve()).encode())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update("\n".join(files).encode())
    return h.hexdigest()[:24]


def _prepare_all(root: Path, files: Sequence[str], spec: InputSpec, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode and prepare every photo; returns pixels (N, H, W, 3) and an ok-mask (N,)."""
    out = np.zeros((len(files), spec.height, spec.width, 3), dtype=np.uint8)
    ok = np.ones(len(files), dtype=bool)

    def work(i: int) -> None:
        try:
            out[i] = prepare(load_image(root / "images" / files[i], spec), spec)
        except ImageError as exc:
            ok[i] = False
            print(f"skipped: {exc}", flush=True)

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
) -> FaceData:
    """Load a face folder in either layout, prepared with `spec` (default InputSpec())."""
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
    splits = index.splits
    if split_file is not None:
        mapping = _read_split_file(Path(split_file))
        splits = np.asarray([mapping.get(f, -1) for f in index.filenames], dtype=np.int8)
    files = index.filenames
    keep = np.arange(len(files))
    if limit is not None and limit < len(files):
        # keep the split proportions: the first `limit` files in order, which for CelebA
        # interleave identities across splits
        keep = keep[:limit]
    files = [files[i] for i in keep]

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(root, spec, files)
    pix_path, ok_path = cache / f"faces-{key}.npy", cache / f"faces-{key}.ok.npy"
    if pix_path.is_file() and ok_path.is_file():
        pixels = np.load(pix_path, allow_pickle=False)
        ok = np.load(ok_path, allow_pickle=False)
    else:
        pixels, ok = _prepare_all(root, files, spec, progress)
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
        splits=splits[sel], root=root,
    )
    return data
