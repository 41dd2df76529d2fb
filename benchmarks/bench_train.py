"""Time of one PRIC adversarial training step relative to a plain supervised step of the
same extractor and primary head, measured in one run (goal: ratio <= 2.0).

    .venv/bin/python benchmarks/bench_train.py [--device auto] [--batch 128] [--steps 20]

Plain step: E + primary head, BCE, one Adam step. Adversarial step: training.train.Trainer.step
(E, adversary(ies), JSD MI estimator, primary head; three optimizers). Steps of the two
kinds are interleaved so load changes on a shared machine hit both alike; medians are
reported. Random inputs: the step cost does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import losses  # noqa: E402
from training.models import create_model  # noqa: E402
from training.train import Trainer, TrainConfig, build_extractor, pick_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_step_fn(cfg: TrainConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    extractor = build_extractor(cfg).to(device).train()
    c, h, w = extractor.feature_shape
    head = create_model("conv_head", in_channels=c, n_out=len(cfg.primary), feature_hw=(h, w)).to(device).train()
    opt = torch.optim.Adam([*extractor.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = losses.bce(head(extractor(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", default="entropy,paper,entropy+multi+mmd")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 64, 64, device=device)
    u = (torch.rand(args.batch, 1, device=device) > 0.5).float()
    y = (torch.rand(args.batch, 2, device=device) > 0.5).float()
    prior = np.full((4, 1), 0.4, np.float32)
    plain = plain_step_fn(TrainConfig(data="", out=""), device)
    advs = {m: Trainer(TrainConfig(data="", out="", method=m), device, prior) for m in args.methods.split(",")}
    for t in advs.values():
        t.train_mode()
    fns: dict[str, Callable[[], None]] = {"plain": lambda: plain(x, y)}
    fns.update({m: (lambda t=t: t.step(x, u, y)) for m, t in advs.items()})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(args.steps + 3):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    print(f"device {device}, batch {args.batch}, {args.steps} steps each, torch threads {torch.get_num_threads()}")
    print(f"plain supervised step: {base * 1e3:.1f} ms ({args.batch / base:.0f} img/s)")
    for name in advs:
        med = statistics.median(times[name])
        print(f"adversarial step [{name}]: {med * 1e3:.1f} ms, ratio {med / base:.2f} (goal <= 2.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
