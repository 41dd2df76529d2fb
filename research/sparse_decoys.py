"""Make a sparse_code model folder whose client draws fakes from a decoy bank and sends
the compact ambiguated code: the same encoder and decoder files as MODEL, a decoy bank
(`decoys.npz`, protocol.sparse_code.DecoyBank) built with the released encoder from the
TRAINING split only, and a card with sparse.decoys, sparse.wire = "compact", the given
k_fake and version. The new card carries no audit: audit and sign it afterwards.

    python -m research.sparse_decoys --model exported_models/sparse-celeba \
        --data ../shared/data/celeba-10k --k-fake 24 --version 6 --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from audit.sparse import OnnxPair
from protocol.datasets import load_faces
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import load_card, sha256_file
from protocol.sparse_code import build_decoy_bank

DECOYS = "decoys.npz"


def make(model: Path, data: Path, out: Path, k_fake: int, version: str, samples: int = 64, seed: int = 0) -> Path:
    card = load_card(model)
    if card.kind != "sparse_code" or card.sparse is None or card.sparse.value_bits is None:
        raise InvalidInputError(f"{model}: needs a sparse_code card with sparse.value_bits")
    if not 0 <= k_fake <= card.sparse.m - card.sparse.k:
        raise InvalidInputError(f"--k-fake {k_fake} must be in [0, m - k = {card.sparse.m - card.sparse.k}]")
    train = load_faces(data, card.input, progress=False).subset("train")
    if len(train) == 0:
        raise InvalidInputError(f"{data}: no training split to build the decoy bank from")
    codes = OnnxPair(model, card, 256).encode(train.pixels)
    out.mkdir(parents=True, exist_ok=True)
    for name in [card.file, *card.extra_files]:
        shutil.copyfile(model / name, out / name)
    build_decoy_bank(codes, card.sparse.k, samples=samples, seed=seed).save(out / DECOYS)
    new = replace(
        card, version=version, sparse=replace(card.sparse, k_fake=k_fake, decoys=DECOYS, wire="compact"),
        extra_files={**card.extra_files, DECOYS: sha256_file(out / DECOYS)}, audit={},
        training={**card.training, "decoys": {"from": f"{len(train)} training photos ({data.name}, split 0)",
                                              "samples_per_position": samples, "seed": seed,
                                              "network_from": card.model_id}},
    ).validate()
    new.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.sparse_decoys")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k-fake", type=int, required=True)
    p.add_argument("--version", required=True)
    a = p.parse_args(argv)
    try:
        out = make(Path(a.model), Path(a.data), Path(a.out), a.k_fake, a.version)
    except PricError as exc:
        print(f"sparse_decoys: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(json.loads((out / "model_card.json").read_text())["sparse"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
