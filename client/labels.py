"""The optional labels CSV of an upload: columns `filename,<task1>,<task2>,...`, one row
per photo, values 0/1 (or -1/1, read as 0/1; an empty cell means unknown). Rows are
matched to photos by file name (not by folder).

Without `tasks`, every column whose cells are all in {-1, 0, 1, ""} is a task, except the
metadata columns of the generic dataset layout (`split`, `identity`); other columns are
reported once and ignored. With `tasks`, exactly those columns are read and each must be
binary.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from protocol.errors import InvalidInputError
from protocol.routes import MAX_LABELS_PER_ITEM
from protocol.wire import LABEL_NAME_RE

METADATA_COLUMNS = ("split", "identity")
_VALUES = {"1": 1, "0": 0, "-1": 0, "": None}

Labels = dict[str, dict[str, int]]
"""file name → {task: 0/1}."""


def read_labels(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    on_note: Callable[[str], None] = lambda _msg: None,
) -> Labels:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read labels CSV ({exc})") from None
    if not rows or not rows[0]:
        raise InvalidInputError(f"{path}: labels CSV is empty")
    header = [h.strip() for h in rows[0]]
    if header[0].lower() != "filename":
        raise InvalidInputError(f"{path}: first column must be 'filename', got {header[0]!r}")
    body = rows[1:]
    for n, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InvalidInputError(f"{path}:{n}: row has {len(row)} cells, header has {len(header)}")

    def binary(col: int) -> bool:
        return all(row[col].strip() in _VALUES for row in body)

    if tasks:
        columns = []
        for task in tasks:
            if task not in header[1:]:
                raise InvalidInputError(f"{path}: no column {task!r} (columns: {', '.join(header[1:])})")
            col = header.index(task)
            if not binary(col):
                raise InvalidInputError(f"{path}: column {task!r} has values other than 0/1/-1")
            columns.append(col)
    else:
        columns = []
        for col, name in enumerate(header[1:], start=1):
            if name in METADATA_COLUMNS:
                continue
            if binary(col):
                columns.append(col)
            else:
                on_note(f"{path}: ignoring column {name!r} (values are not 0/1/-1)")
    for col in columns:
        if not LABEL_NAME_RE.match(header[col]):
            raise InvalidInputError(f"{path}: column name {header[col]!r} is not a valid task name")
    if len(columns) > MAX_LABELS_PER_ITEM:
        raise InvalidInputError(f"{path}: {len(columns)} task columns, the limit is {MAX_LABELS_PER_ITEM}; choose with --tasks")
    labels: Labels = {}
    for n, row in enumerate(body, start=2):
        name = row[0].strip()
        if not name:
            raise InvalidInputError(f"{path}:{n}: empty filename")
        if name in labels:
            raise InvalidInputError(f"{path}:{n}: file name {name!r} appears twice")
        labels[name] = {
            header[col]: v for col in columns if (v := _VALUES[row[col].strip()]) is not None
        }
    return labels
