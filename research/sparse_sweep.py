"""What the number of fakes and the fake-value sampler do to the no-key attacks.

For each k_fake and each sampler, the first N test photos are encoded with the exported
ONNX encoder, ambiguated with `protocol.sparse_code.ambiguate` (k_fake replaced in the
card's SparseSpec; values on the card's `value_bits` grid when it sets one) and decoded
with the exported decoder: (a) authorised (the released true values), (b) as is,
(c) random support guess, (d) k largest / k smallest magnitudes, support recovery of
(d) vs chance k/k', and (e) JPEG at the wire bytes of that k' (L·k'·4 bytes).

Samplers: "bootstrap" is the shipped `protocol.sparse_code.sample_fake_values`;
"interp" is the previous one (interpolated empirical inverse CDF, never beyond the
smallest / largest true magnitude), kept here only to measure it.

    python -m research.sparse_sweep --model exported_models/sparse-celeba \
        --data ../shared/data/celeba-10k --n 400 --k-fake 11,22,33,55 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import protocol.sparse_code as sparse_code
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import load_card
from protocol.datasets import load_faces
from audit.quality import image_quality as quality, unit
from audit.sparse import OnnxPair, dense_from_mask, jpeg_at_budget, support_guess

REPORT = "sparse_sweep.json"


def interp_fake_values(true_values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The previous sampler (sparse-celeba@1's audit): magnitudes interpolated between the
    smallest and largest true magnitude, so both extremes are always true. 1-D → (n,)."""
    mags = np.sort(np.abs(true_values.astype(np.float64)))
    if mags.size == 1:
        fake_mag = np.full(n, mags[0])
    else:
        fake_mag = np.interp(rng.uniform(0.0, mags.size - 1, size=n), np.arange(mags.size), mags)
    signs = np.where(rng.random(n) < float(np.mean(true_values > 0)), 1.0, -1.0)
    return (fake_mag * signs).astype(np.float32)


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "bootstrap": sparse_code.sample_fake_values,
    "interp": interp_fake_values,
}


@dataclass(frozen=True)
class SweepConfig:
    model: str
    data: str
    out: str
    n: int = 400
    k_fakes: tuple[int, ...] = (11, 22, 33, 55)
    samplers: tuple[str, ...] = ("bootstrap", "interp")
    seed: int = 0


def sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run every (sampler, k_fake) cell; returns and writes OUT/sparse_sweep.json."""
    model_dir = Path(cfg.model)
    card = load_card(model_dir)
    if card.kind != "sparse_code" or card.sparse is None:
        raise InvalidInputError(f"{model_dir}: card kind is {card.kind!r}, the sweep needs 'sparse_code'")
    models = OnnxPair(model_dir, card, 256)
    test = load_faces(Path(cfg.data), card.input, progress=False).subset("test")
    test = test.select(np.arange(min(cfg.n, len(test))))
    ref = unit(test.pixels)
    codes = models.encode(test.pixels)
    authorised = quality(ref, models.decode(np.stack([c.astype(np.float16).astype(np.float32) for c in codes])))
    rows = []
    for sampler in cfg.samplers:
        for k_fake in cfg.k_fakes:
            spec = replace(card.sparse, k_fake=k_fake)
            rng = np.random.default_rng(cfg.seed)
            pairs = [sparse_code.ambiguate(c, spec, rng, fake_values=SAMPLERS[sampler]) for c in codes]
            truth = [sparse_code.unpack_key(key)[0] for _, key in pairs]
            # what a key holder decodes: the true values as released (on the card's value grid if it has one)
            held = np.stack([sparse_code.disambiguate(a, key, spec.m) for a, key in pairs])
            row: dict[str, Any] = {"sampler": sampler, "k_fake": k_fake, "k_prime": spec.k_prime,
                                   "chance": spec.k / spec.k_prime, "key_bytes": len(pairs[0][1]),
                                   "wire_bytes": spec.L * spec.k_prime * 4}
            row["authorised"] = quality(ref, models.decode(held))
            row["as_is"] = quality(ref, models.decode(np.stack([a.to_dense(spec.m) for a, _ in pairs])))
            for how in ("random", "largest", "smallest"):
                masks = [support_guess(a, spec.k, how, rng) for a, _ in pairs]
                row[how] = quality(ref, models.decode(np.stack([dense_from_mask(a, g, spec.m)
                                                                for (a, _), g in zip(pairs, masks)])))
                row[how]["recovery"] = float(np.mean([(g & t).sum() / t.sum() for g, t in zip(masks, truth)]))
            maxima = [t[np.arange(len(t)), np.argmax(np.abs(a.values.astype(np.float32)), axis=1)]
                      for (a, _), t in zip(pairs, truth)]
            row["largest_value_is_true"] = float(np.mean(maxima))
            jpeg = [jpeg_at_budget(p, row["wire_bytes"]) for p in test.pixels]
            row["jpeg"] = quality(ref, np.stack([j[0] for j in jpeg]))
            row["jpeg"]["mean_bytes"] = float(np.mean([j[1] for j in jpeg]))
            rows.append(row)
            print(format_row(row, authorised), file=sys.stderr)
    report = {"model_id": card.model_id, "n_test": int(len(test)), "authorised": authorised, "rows": rows,
              "config": asdict(cfg)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_row(row: dict[str, Any], authorised: dict[str, float]) -> str:
    """One markdown table row: sampler, k_fake, PSNRs, gaps to the random guess, recoveries."""
    rg = row["random"]["psnr"]
    authorised = row.get("authorised", authorised)
    return (f"| {row['sampler']} | {row['k_fake']} | {row['wire_bytes']} | {row['key_bytes']} "
            f"| {authorised['psnr']:.2f} | {row['jpeg']['psnr']:.2f} | {row['as_is']['psnr']:.2f} ({row['as_is']['psnr'] - rg:+.2f}) "
            f"| {rg:.2f} | {row['largest']['psnr']:.2f} ({row['largest']['psnr'] - rg:+.2f}) "
            f"| {row['smallest']['psnr']:.2f} ({row['smallest']['psnr'] - rg:+.2f}) "
            f"| {100 * row['largest']['recovery']:.1f} / {100 * row['smallest']['recovery']:.1f} / {100 * row['chance']:.1f} "
            f"| {100 * row['largest_value_is_true']:.1f} |")


HEADER = ("| sampler | k_fake | wire bytes | key bytes | (a) authorised | (e) JPEG | (b) as is (Δ) | (c) random | "
          "(d) k largest (Δ) | (d) k smallest (Δ) | recovery largest / smallest / chance % | largest value true % |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.sparse_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported sparse_code model folder")
    p.add_argument("--data", required=True, help="dataset folder with a test split")
    p.add_argument("--out", required=True, help="folder for sparse_sweep.json")
    p.add_argument("--n", type=int, default=SweepConfig.n, help="first N test photos")
    p.add_argument("--k-fake", default="11,22,33,55", help="comma-separated k_fake values")
    p.add_argument("--samplers", default="bootstrap,interp", help=f"comma-separated, from {sorted(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        k_fakes = tuple(int(v) for v in args.k_fake.split(","))
        samplers = tuple(s for s in args.samplers.split(",") if s)
    except ValueError:
        print(f"sparse_sweep: --k-fake {args.k_fake!r} must be comma-separated integers", file=sys.stderr)
        return 2
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        print(f"sparse_sweep: --samplers {unknown[0]!r} is not one of {sorted(SAMPLERS)}", file=sys.stderr)
        return 2
    try:
        report = sweep(SweepConfig(model=args.model, data=args.data, out=args.out, n=args.n, k_fakes=k_fakes,
                                   samplers=samplers, seed=args.seed))
    except PricError as exc:
        print(f"sparse_sweep: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(HEADER)
    for row in report["rows"]:
        print(format_row(row, report["authorised"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
