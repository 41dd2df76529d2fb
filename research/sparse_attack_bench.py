"""The audit's learned no-key attacker (audit.sparse_attacks) against one ambiguation
variant, on the first N test photos (or all): support precision and decode PSNR next to a
random guess and the authorised decode, with their 95 % intervals and run time.

    python -m research.sparse_attack_bench --model exported_models/sparse-celeba \
        --data ../shared/data/celeba-10k --variant shipped --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from audit.quality import image_quality, unit
from audit.sparse import OnnxPair, dense_from_mask, support_guess
from audit.sparse_attacks import EM_ITERS, EM_SEEDS, format_attack_table, learned_support_attack
from protocol.datasets import load_faces
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import load_card
from protocol.sparse_code import DecoyBank, ambiguate, bank_fakes, build_decoy_bank, disambiguate, unpack_key


def variant(name: str, card: Any, bank: DecoyBank | None,
            decoys: Callable[..., Any] | None = None) -> tuple[Any, Callable[..., tuple[Any, bytes]]]:
    """'shipped' (the card's sampler) or SAMPLER-KFAKE with SAMPLER uniform (the shipped
    fake positions and values), matched (decoy bank: `bank_fakes`), or coherent / projected
    (whole decoy codes: `research.sparse_coherent`, passed as `decoys`) →
    (SparseSpec, ambiguate_fn(code, rng) → (ambiguated code, key))."""
    sp = card.sparse
    if name == "shipped":
        return sp, lambda c, r: ambiguate(c, sp, r)
    sampler, _, k_fake = name.partition("-")
    spec = replace(sp, k_fake=int(k_fake))
    if sampler == "uniform":
        return spec, lambda c, r: ambiguate(c, spec, r)
    if sampler == "matched" and bank is not None:
        draw = bank_fakes(bank)
        return spec, lambda c, r: ambiguate(c, spec, r, fakes=draw)
    if sampler.partition("+")[0] in ("coherent", "projected") and decoys is not None:
        if getattr(decoys, "profile", None) is not None:  # public magnitudes: the true ones in the key
            spec = replace(spec, value_bits=spec.value_bits or 6, decoys="research", magnitudes="key")
        return spec, lambda c, r: ambiguate(c, spec, r, fakes=decoys)
    raise InvalidInputError(f"--variant {name!r}: expected shipped, uniform-K, matched-K, coherent-K or projected-K")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.sparse_attack_bench")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--variant", default="shipped")
    p.add_argument("--n", type=int, default=0, help="first N test photos (0: all)")
    p.add_argument("--max-train", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--net-epochs", type=int, default=None)
    p.add_argument("--em-seeds", type=int, default=EM_SEEDS, help="the code model's hard steps")
    p.add_argument("--em-iters", type=int, default=EM_ITERS, help="the code model's EM steps after them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        if a.em_seeds < 0 or a.em_iters < 0 or a.em_seeds + a.em_iters < 1:
            raise InvalidInputError(f"--em-seeds {a.em_seeds} --em-iters {a.em_iters}: expected counts >= 0, "
                                    "at least one step in all")
        model_dir = Path(a.model)
        card = load_card(model_dir)
        sp = card.sparse
        models = OnnxPair(model_dir, card, 256)
        data = load_faces(Path(a.data), card.input, progress=False)
        test, train = data.subset("test"), data.subset("train")
        if a.n:
            test = test.select(np.arange(min(a.n, len(test))))
        rng = np.random.default_rng(a.seed)
        bank = build_decoy_bank(models.encode(train.pixels), sp.k) if a.variant.startswith("matched") else None
        decoys, public = None, False
        if a.variant.startswith(("coherent", "projected")):
            from research.sparse_coherent import coherent_variant

            name, _, k_fake = a.variant.partition("-")
            n_dec = int(k_fake) // card.sparse.k if k_fake.isdigit() else 1
            decoys, public = coherent_variant(name, models, train.pixels, n_dec)
        sp, fn = variant(a.variant, card, bank, decoys)
        card = SimpleNamespace(sparse=sp)
        ref = unit(test.pixels)
        pairs = [fn(c, rng) for c in models.encode(test.pixels)]
        ambs, keys = [x for x, _ in pairs], [x for _, x in pairs]
        auth = models.decode(np.stack([disambiguate(x, key, sp.m) for x, key in zip(ambs, keys)]))
        extra = {}
        if public:  # what the whole true support gives without the key's magnitudes: the attacker's ceiling
            extra["public_magnitudes"] = image_quality(ref, models.decode(np.stack(
                [dense_from_mask(x, unpack_key(key)[0], sp.m) for x, key in zip(ambs, keys)])))
        rnd = models.decode(np.stack([dense_from_mask(x, support_guess(x, sp.k, "random", rng), sp.m) for x in ambs]))
        base = {"random": image_quality(ref, rnd), "authorised": image_quality(ref, auth),
                "images": [auth, rnd], "image_names": ["authorised", "random guess"]}
        att = learned_support_attack(models, card, train.pixels, ambs, keys, ref, rng, baseline=base,
                                     out_dir=Path(a.out), seed=a.seed, max_train=a.max_train, rounds=a.rounds,
                                     net_epochs=a.net_epochs, ambiguate_fn=fn,
                                     em_seeds=a.em_seeds, em_iters=a.em_iters)
    except PricError as exc:
        print(f"sparse_attack_bench: {exc.message}", file=sys.stderr)
        return exc.exit_code
    att["variant"], att["seconds_total"] = a.variant, time.time() - t0
    if extra:
        att["true_support_with_public_magnitudes"] = extra["public_magnitudes"]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"attack_{a.variant}.json").write_text(json.dumps(att, indent=2) + "\n")
    print(format_attack_table(att))
    print(json.dumps({k: att[k] for k in ("best", "best_precision", "best_precision_ci95", "psnr_over_random",
                                          "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
