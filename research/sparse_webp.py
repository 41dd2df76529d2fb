"""WebP (Pillow, method 6, best quality that fits) of every test photo at given byte
budgets, optionally less the ChaCha20-Poly1305 overhead (12-byte nonce + 16-byte tag), the
photo prepared as the model's card prepares it: what a user would pick instead of the
sparse mode (docs/results-sparse.md).

    python -m research.sparse_webp --model exported_models/sparse-celeba \
        --data ../shared/data/celeba-10k --wire-bytes 466
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from audit.quality import unit
from audit.sparse import AEAD_OVERHEAD_BYTES, _webp_row
from protocol.datasets import load_faces
from protocol.errors import PricError
from protocol.model_card import load_card


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.sparse_webp")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--wire-bytes", required=True, help="comma-separated budgets on the wire, e.g. 259,466")
    p.add_argument("--aead", action="store_true", help="leave room for the AEAD nonce and tag in each budget")
    a = p.parse_args(argv)
    try:
        card = load_card(Path(a.model))
        px = load_faces(Path(a.data), card.input, progress=False).subset("test").pixels
    except PricError as exc:
        print(f"sparse_webp: {exc.message}", file=sys.stderr)
        return exc.exit_code
    for wire in (int(b) for b in a.wire_bytes.split(",")):
        row, _ = _webp_row(unit(px), px, wire - (AEAD_OVERHEAD_BYTES if a.aead else 0))
        print(json.dumps({"wire_bytes": wire, "aead": a.aead, **{k: round(v, 4) for k, v in row.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
