"""Train the sparse ambiguation autoencoder (`pric-train sparse ...`).

BCE between sigmoid outputs and the [0, 1] pixels (as the paper), Adam 2e-3, train split
only; the checkpoint with the best validation PSNR at the test-time k is kept.

Writes RUN_DIR/metrics.jsonl (one line per epoch), RUN_DIR/checkpoint.pt and
RUN_DIR/config.json ("mode": "sparse", the InputSpec, model and sparse settings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from protocol.align import ALIGN_HELP
from protocol.config import add_options, from_namespace, option
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import InputSpec, SparseSpec
from protocol.datasets import FaceData, load_faces
from training.data import pick_device, to_input, unit_pixels
from training.models.sparse import SparseAEConfig, SparseAutoencoder

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


LOSSES = ("bce", "mse")


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in str(text).split(","))
    except ValueError:
        raise InvalidInputError(f"--channels {text!r} must be comma-separated integers") from None


@dataclass(frozen=True)
class SparseTrainConfig:
    """`pric-train sparse`: every option declared here once (protocol.config); saved in the
    run's config.json under "train"."""

    data: str = option(help="dataset folder (CelebA or generic layout)")
    out: str = option(help="run folder to write")
    epochs: int = option(12, "training epochs", type=int)
    L: int = option(4, "number of code maps", type=int)
    m: int = option(256, "length of each code map", type=int)
    k_train: int | None = option(None, "non-zeros per map while training (default: --k)", type=int)
    k: int = option(10, "non-zeros per map at test time (exported)", type=int)
    k_fake: int | None = option(None, "fake non-zeros added by ambiguation (default: --k)", type=int)
    channels: tuple[int, ...] = option((32, 64, 64), "channels of the down-sampling blocks, comma separated",
                                       parse=_channels, default_arg="32,64,64")
    size: int = option(64, "input side in pixels", type=int, choices=[64, 128])
    batch_size: int = option(64, "batch size", type=int)
    lr: float = option(2e-3, "Adam learning rate", type=float)
    device: str = option("auto", "auto (cuda when available), cpu or cuda", choices=["auto", "cpu", "cuda"])
    seed: int = option(0, "random seed", type=int)
    threads: int = option(2, "CPU threads for torch", type=int)
    limit: int | None = option(None, "use only the first N photos (smoke runs)", type=int)
    loss: str = option("bce", "bce: BCE on the sigmoid output (the paper); mse: mean squared error of the sigmoid "
                              "output (what PSNR measures)", choices=list(LOSSES))
    init: str | None = option(None, "warm start: a sparse run folder whose checkpoint (same model settings) "
                                    "initialises the model, or an exported sparse release (its ONNX weights; "
                                    "training.sparse.release_init)")
    align: str | None = option(None, ALIGN_HELP)

    def model_config(self) -> SparseAEConfig:
        return SparseAEConfig(height=self.size, width=self.size, L=self.L, m=self.m,
                              k_train=self.k_train, k=self.k, channels=self.channels)

    def input_spec(self) -> InputSpec:
        return InputSpec(height=self.size, width=self.size)

    def sparse_spec(self) -> SparseSpec:
        return SparseSpec(L=self.L, m=self.m, k=self.k, k_fake=self.k_fake)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pric-train sparse", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--mode", default="sparse", choices=["sparse"], help=argparse.SUPPRESS)  # earlier releases' spelling
    return add_options(p, SparseTrainConfig)


def config_from_args(args: argparse.Namespace) -> SparseTrainConfig:
    cfg = from_namespace(SparseTrainConfig, args)
    cfg = replace(cfg, k_train=cfg.k if cfg.k_train is None else cfg.k_train,
                  k_fake=cfg.k if cfg.k_fake is None else cfg.k_fake)
    checks = [
        (cfg.epochs >= 1 or (cfg.epochs == 0 and bool(cfg.init)),
         f"--epochs {cfg.epochs} must be at least 1 (0 only with --init: the warm start as it is)"),
        (cfg.L >= 1 and cfg.m >= 2, f"--L {cfg.L} and --m {cfg.m} must be positive (m >= 2)"),
        (1 <= cfg.k <= cfg.m, f"--k {cfg.k} must be in [1, m={cfg.m}]"),
        (1 <= cfg.k_train <= cfg.m, f"--k-train {cfg.k_train} must be in [1, m={cfg.m}]"),
        (0 <= cfg.k_fake <= cfg.m - cfg.k, f"--k-fake {cfg.k_fake} must be in [0, m-k={cfg.m - cfg.k}]"),
        (cfg.size % 2 ** len(cfg.channels) == 0, f"--size {cfg.size} must be divisible by 2^{len(cfg.channels)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InvalidInputError(msg)
    return cfg




def reconstruction_losses(out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE of the sigmoid output (computed from logits), its MSE (scalars) and per-image
    PSNR (B,), for logits and target (B, 3, H, W)."""
    bce = F.binary_cross_entropy_with_logits(out["logits"], target)
    mse = (torch.sigmoid(out["logits"]) - target).pow(2).flatten(1).mean(1)
    return {"bce": bce, "mse": mse.mean(), "psnr": -10.0 * torch.log10(mse.clamp_min(1e-10))}


def warm_start(model: SparseAutoencoder, run_dir: Path, pixels: np.ndarray | None = None) -> None:
    """Load the checkpoint of sparse run `run_dir` into `model` (same model settings up to
    k and k_train, else InvalidInputError naming the run). `run_dir` may be an exported
    release instead: its ONNX weights, BatchNorms rebuilt on `pixels` (training photos)."""
    from training.sparse.release_init import is_release, load_release

    if is_release(run_dir):
        if pixels is None:
            raise InvalidInputError(f"--init {run_dir}: a release needs photos to rebuild its BatchNorms")
        load_release(model, run_dir, pixels)
        return
    if not (Path(run_dir) / CONFIG).is_file() or not (Path(run_dir) / CHECKPOINT).is_file():
        raise InvalidInputError(f"--init {run_dir}: neither a sparse training run ({CONFIG} and {CHECKPOINT}) nor an "
                                "exported sparse release (a folder with model_card.json)")
    init_model, _ = load_run(run_dir)
    # k and k_train only set the top-k, not the weights: a run may be fine-tuned at another k
    if replace(init_model.cfg, k=model.cfg.k, k_train=model.cfg.k_train) != model.cfg:
        raise InvalidInputError(f"--init {run_dir}: its model settings {asdict(init_model.cfg)} differ from this run's")
    model.load_state_dict(init_model.state_dict())


@torch.no_grad()
def evaluate(model: SparseAutoencoder, pixels: torch.Tensor, spec: InputSpec, k: int, device: torch.device,
             batch_size: int = 256) -> dict[str, float]:
    """Mean BCE and PSNR over `pixels` (N, H, W, 3) uint8 with k non-zeros per map."""
    model.eval()
    bce_sum, psnr_sum = 0.0, 0.0
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i:i + batch_size].to(device)
        x, t = to_input(batch, spec), unit_pixels(batch)
        losses = reconstruction_losses(model(x, k=k), t)
        bce_sum += float(losses["bce"]) * len(x)
        psnr_sum += float(losses["psnr"].sum())
    n = max(1, len(pixels))
    return {"bce": bce_sum / n, "psnr": psnr_sum / n}


def _splits(data: FaceData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation pixels; without a validation split, 10% of train is held out."""
    train, val = data.subset("train").pixels, data.subset("val").pixels
    if len(train) == 0:
        raise InvalidInputError(f"{data.root}: the dataset has no training split (split 0)")
    if len(val) == 0:
        perm = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, len(train) // 10)
        train, val = train[perm[n_val:]], train[perm[:n_val]]
    return train, val


def train(cfg: SparseTrainConfig) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    spec = cfg.input_spec()
    from protocol.align import training_aligner

    data = load_faces(cfg.data, spec, limit=cfg.limit, progress=False, aligner=training_aligner(cfg.align))
    train_px, val_px = _splits(data, cfg.seed)
    train_t = torch.from_numpy(train_px).to(device)
    val_t = torch.from_numpy(val_px).to(device)

    model = SparseAutoencoder(cfg.model_config())
    if cfg.init:
        warm_start(model, Path(cfg.init), train_px[:512])
    model = model.to(device)
    out = Path(cfg.out)
    if cfg.epochs == 0:  # --init as it is: a run to export a release again (e.g. with another card)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).write_text("")
        val = evaluate(model, val_t, spec, cfg.k, device)
        torch.save({"model": model.state_dict(), "model_config": asdict(cfg.model_config())}, out / CHECKPOINT)
        summary = run_summary(cfg, {"val_psnr": val["psnr"], "epoch": 0}, len(train_t), len(val_t), device)
        (out / CONFIG).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_t) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text("")
    gen = torch.Generator().manual_seed(cfg.seed)
    best: dict[str, Any] = {"val_psnr": -math.inf, "epoch": 0}
    summary = run_summary(cfg, best, len(train_t), len(val_t), device)
    (out / CONFIG).write_text(json.dumps(summary, indent=2) + "\n")  # a stopped run can still be exported
    bar = tqdm(range(1, cfg.epochs + 1), desc="sparse AE", unit="epoch", file=sys.stderr)
    for epoch in bar:
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(train_t), generator=gen).to(device)
        bce_sum = 0.0
        for i in range(steps_per_epoch):
            batch = train_t[perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            # horizontal flips: faces are roughly symmetric, so this is free extra data
            flip = torch.rand(len(batch), generator=gen) < 0.5
            batch = torch.where(flip.to(device).view(-1, 1, 1, 1), batch.flip(2), batch)
            x, target = to_input(batch, spec), unit_pixels(batch)
            losses = reconstruction_losses(model(x), target)
            loss = losses[cfg.loss]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bce_sum += float(losses["bce"].detach()) * len(batch)
        val = evaluate(model, val_t, spec, cfg.k, device)
        val_half = evaluate(model, val_t, spec, max(1, cfg.k // 2), device)
        row = {"epoch": epoch, "train_bce": bce_sum / len(train_t), "val_bce": val["bce"],
               "val_psnr": val["psnr"], "val_psnr_half_k": val_half["psnr"], "seconds": time.time() - t0}
        with (out / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(train_bce=f"{row['train_bce']:.4f}", val_psnr=f"{val['psnr']:.2f}")
        if val["psnr"] > best["val_psnr"]:
            best = {"val_psnr": val["psnr"], "epoch": epoch}
            torch.save({"model": model.state_dict(), "model_config": asdict(cfg.model_config())}, out / CHECKPOINT)
            summary = run_summary(cfg, best, len(train_t), len(val_t), device)
            (out / CONFIG).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_summary(cfg: SparseTrainConfig, best: dict[str, Any], n_train: int, n_val: int,
                device: torch.device) -> dict[str, Any]:
    """The run's config.json: mode, train config, InputSpec, model and sparse settings, best epoch."""
    return {
        "mode": "sparse",
        "train": asdict(cfg),
        "input": asdict(cfg.input_spec()),
        "model": asdict(cfg.model_config()),
        "sparse": {k: v for k, v in asdict(cfg.sparse_spec()).items() if v is not None},  # as before value_bits
        "best_epoch": best["epoch"],
        "best_val_psnr": best["val_psnr"] if math.isfinite(best["val_psnr"]) else None,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "device": str(device),
    }


def load_run(run_dir: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Rebuild the trained autoencoder (eval mode, CPU) and the run's config.json."""
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / CONFIG, run_dir / CHECKPOINT
    if not cfg_path.is_file() or not ckpt_path.is_file():
        raise InvalidInputError(f"{run_dir}: not a sparse training run (needs {CONFIG} and {CHECKPOINT})")
    config = json.loads(cfg_path.read_text())
    if config.get("mode") != "sparse":
        raise InvalidInputError(f"{cfg_path}: mode is {config.get('mode')!r}, expected 'sparse'")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    mc = dict(ckpt["model_config"])
    mc["channels"] = tuple(mc["channels"])
    model = SparseAutoencoder(SparseAEConfig(**mc))
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train(config_from_args(args))
    except PricError as exc:
        print(f"pric-train: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(f"best epoch {summary['best_epoch']}: val PSNR {summary['best_val_psnr']:.2f} dB at k={summary['sparse']['k']}"
          f" → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
