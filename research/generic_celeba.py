"""celeba-10k in the generic layout, as a model builder brings their own folder.

    python -m research.generic_celeba --data ../shared/data/celeba-10k --out runs/celeba-generic

writes OUT/images (a symlink to the data set's images/, nothing copied) and OUT/labels.csv
with `filename`, `identity` and the 40 attributes as 0/1, and NO `split` column: every
tool then derives the same split (protocol.datasets.derive_split). No dataset.json is
written, so the photos get the generic layout's default framing (the whole photo) unless
--crop-box says otherwise; docs/model-builder.md's figures were measured on this folder.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Sequence


def convert(data: Path, out: Path) -> Path:
    lines = (data / "list_attr_celeba.txt").read_text().splitlines()
    attr_names = lines[1].split()
    ident_file = data / "identity_CelebA.txt"
    ident = dict(l.split() for l in ident_file.read_text().splitlines() if l.strip()) if ident_file.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if not link.exists():
        os.symlink((data / "images").resolve(), link, target_is_directory=True)
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "identity", *attr_names])
        for line in lines[2:]:
            parts = line.split()
            if parts:
                w.writerow([parts[0], ident.get(parts[0], ""), *("1" if v == "1" else "0" for v in parts[1:])])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a CelebA-layout folder (celeba-10k)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(f"wrote {convert(Path(args.data), Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
