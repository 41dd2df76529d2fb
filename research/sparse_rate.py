"""Rate and quality of the compact true code at several k and value bits, next to JPEG.

For a sparse training run (torch checkpoint, so the test-time k is free) and the first N
test photos: the code at each test-time k, packed with `protocol.sparse_code.pack_compact`
at each value_bits (and float16 values), unpacked and decoded; PSNR / SSIM of that
reconstruction, the measured bytes, and plain and best-of-resolutions JPEG at those bytes
(`audit.sparse._jpeg_row`). No training, no ambiguation: it answers "which k and
value_bits put the most quality into the bytes a key holder keeps".

    python -m research.sparse_rate --run runs/sparse-celeba-v3ft --data DIR \
        --k 15,20,24,28 --value-bits 5,6,7,8 --n 400 --out DIR

Writes OUT/sparse_rate.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocol.errors import InvalidInputError, PricError
from protocol.model_card import InputSpec, SparseSpec
from protocol.sparse_code import pack_compact, unpack_compact
from protocol.datasets import load_faces
from audit.quality import image_quality as quality, unit
from audit.sparse import _jpeg_row

REPORT = "sparse_rate.json"


@dataclass(frozen=True)
class RateConfig:
    run: str
    data: str
    out: str
    ks: tuple[int, ...] = (15, 20, 24, 28)
    value_bits: tuple[int | None, ...] = (5, 6, 7, 8, None)
    n: int = 400
    threads: int = 1
    multires: bool = True


def _parse_list(text: str, flag: str, allow_none: bool = False) -> tuple[Any, ...]:
    """'5,6,none' → (5, 6, None); anything else → InvalidInputError naming the flag."""
    out: list[Any] = []
    for part in text.split(","):
        part = part.strip().lower()
        if allow_none and part in ("none", "float16"):
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise InvalidInputError(f"{flag} {text!r} must be comma-separated integers"
                                    + (" or 'none'" if allow_none else "")) from None
    return tuple(out)


def measure(cfg: RateConfig) -> dict[str, Any]:
    """Every (k, value_bits) cell; returns and writes OUT/sparse_rate.json."""
    import torch

    from training.models.sparse import top_k_per_map
    from training.data import to_input
    from training.sparse.train import load_run

    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, config = load_run(Path(cfg.run))
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["input"].items()})
    mc = model.cfg
    bad = [k for k in cfg.ks if not 1 <= k <= mc.m]
    if bad:
        raise InvalidInputError(f"--k {bad[0]} must be in [1, m={mc.m}]")
    test = load_faces(Path(cfg.data), spec, progress=False).subset("test")
    if len(test) == 0:
        raise InvalidInputError(f"{cfg.data}: the dataset has no test split (split 2)")
    pixels = test.pixels[:cfg.n]
    ref = unit(pixels)
    x = to_input(pixels, spec)
    with torch.no_grad():
        z = torch.cat([model.encoder(x[i:i + 256]) for i in range(0, len(x), 256)])

    def decode(codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = [torch.sigmoid(model.decoder(torch.from_numpy(codes[i:i + 256]))) for i in range(0, len(codes), 256)]
        return np.moveaxis(torch.cat(out).numpy(), 1, -1).clip(0.0, 1.0)

    rows: list[dict[str, Any]] = []
    jpeg_cache: dict[int, dict[str, Any]] = {}
    for k in cfg.ks:
        codes = top_k_per_map(z, k).numpy()
        float_q = quality(ref, decode(codes))
        for vb in cfg.value_bits:
            sp = SparseSpec(L=mc.L, m=mc.m, k=k, k_fake=0, value_bits=vb)
            packed = [pack_compact(c, k, vb) for c in codes]
            rec = np.stack([unpack_compact(b, sp) for b in packed])
            nbytes = int(round(float(np.mean([len(b) for b in packed]))))
            if nbytes not in jpeg_cache:
                plain, _ = _jpeg_row(ref, pixels, nbytes, multires=False)
                entry = {"plain": plain}
                if cfg.multires:
                    entry["multires"], _ = _jpeg_row(ref, pixels, nbytes, multires=True)
                jpeg_cache[nbytes] = entry
            row = {"k": k, "value_bits": vb, "bytes": nbytes, "bits_per_pixel": nbytes * 8 / (spec.height * spec.width),
                   "authorised": quality(ref, decode(rec)), "unquantised": float_q, **jpeg_cache[nbytes]}
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    report = {"run": cfg.run, "n_test": int(len(pixels)), "rows": rows, "seconds": time.time() - t0,
              "config": asdict(cfg)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


HEADER = ("| k | value bits | bytes | authorised PSNR (unquantised) | plain JPEG (over budget) | Δ plain "
          "| best-of-resolutions JPEG | Δ best |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def format_row(row: dict[str, Any]) -> str:
    """One markdown row: the code's bytes and PSNR and the margins over both JPEGs."""
    a, p = row["authorised"]["psnr"], row["plain"]["psnr"]
    mr = row.get("multires")
    best = f"{mr['psnr']:.2f} | {a - mr['psnr']:+.2f}" if mr else "– | –"
    return (f"| {row['k']} | {row['value_bits'] or 'float16'} | {row['bytes']} | {a:.2f} ({row['unquantised']['psnr']:.2f}) "
            f"| {p:.2f} ({100 * row['plain']['over_budget_fraction']:.0f} %) | {a - p:+.2f} | {best} |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.sparse_rate", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="sparse training run folder (config.json + checkpoint.pt)")
    p.add_argument("--data", required=True, help="dataset folder with a test split")
    p.add_argument("--out", required=True, help="folder for sparse_rate.json")
    p.add_argument("--k", default="15,20,24,28", help="comma-separated test-time k")
    p.add_argument("--value-bits", default="5,6,7,8,none", help="comma-separated bits per value; 'none': float16")
    p.add_argument("--n", type=int, default=RateConfig.n, help="first N test photos")
    p.add_argument("--threads", type=int, default=RateConfig.threads, help="CPU threads for torch")
    p.add_argument("--no-multires", action="store_true", help="skip the best-of-resolutions JPEG")
    args = p.parse_args(argv)
    try:
        cfg = RateConfig(run=args.run, data=args.data, out=args.out, ks=_parse_list(args.k, "--k"),
                         value_bits=_parse_list(args.value_bits, "--value-bits", allow_none=True), n=args.n,
                         threads=args.threads, multires=not args.no_multires)
        report = measure(cfg)
    except PricError as exc:
        print(f"sparse_rate: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(HEADER)
    for row in report["rows"]:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
