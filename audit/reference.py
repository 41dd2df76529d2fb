"""The raw-image reference classifier: what a classifier of ordinary strength reads from the
photos themselves, the bar every release's leakage and utility is read against ("raw-image
CNN" columns, the share of the raw-image gain a release keeps).

    photo (B, 3, H, W) ─► stem (3x3 stride 2, 3x3 max pool) ─► 3 stages of basic residual
    blocks, widths 32-64-128, each stage halving the map ─► global average pool ─► linear
    ─► one logit per attribute

It is trained over all attributes at once (multi-label, BCE summed over the attributes) with random horizontal flips
and ±4-pixel shifts, by SGD with Nesterov momentum under a one-cycle learning-rate schedule
(warm-up, then cosine annealing to ~0) of a fixed number of epochs that always runs to its
end: no early stopping, so the network is trained to convergence rather than stopped while
it is still learning. The epoch is chosen per attribute on validation, never on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from audit.attacks import TrainedAttack, _batch, _predict, _standardiser, flip_and_shift, keep_better_columns

WIDTHS = (32, 64, 128)
BLOCKS = (2, 2, 2)
REFERENCE_MODEL = (f"ResNet ({'-'.join(map(str, BLOCKS))} basic blocks, widths {'-'.join(map(str, WIDTHS))}), "
                   "trained with random flips and ±4-pixel shifts, read with test-time flips")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (batch norm, ReLU) with an identity shortcut, or a 1x1 projection
    where the block changes width or stride: (B, c_in, h, w) → (B, c_out, h/stride, w/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


class ReferenceResNet(nn.Module):
    """The raw-image reference network: (B, C, H, W) → (B, n_out) logits.

    A small ResNet: a 3x3 stride-2 stem convolution and a 3x3 stride-2 max pool (a 64x64
    photo becomes a 16x16 map), then `blocks` basic blocks per stage at widths `widths`,
    every stage after the first starting with a stride-2 block, global average pooling and
    a linear head. In eval mode it reads each photo and its mirror image and averages the
    logits (test-time flip, as the training's flips make both equally the photo)."""

    def __init__(self, input_shape: Sequence[int], n_out: int, widths: Sequence[int] = WIDTHS,
                 blocks: Sequence[int] = BLOCKS) -> None:
        super().__init__()
        c = int(input_shape[0])
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        layers: list[nn.Module] = []
        ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(BasicBlock(ch, w, 2 if (b == 0 and i > 0) else 1))
                ch = w
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, n_out))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # each residual branch starts near zero: the block starts as its shortcut
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.head(self.stages(self.stem(x)))
        # in use, the mean of the logits of the photo and its mirror image (test-time flip)
        both = self.head(self.stages(self.stem(torch.cat([x, x.flip(3)]))))
        return (both[:len(x)] + both[len(x):]) / 2


@dataclass(frozen=True)
class Schedule:
    """How the reference is trained: SGD (Nesterov momentum) under a one-cycle learning rate,
    `warmup` of the steps rising from peak_lr/25 to `peak_lr`, then cosine annealing to
    peak_lr/25e4, over exactly `epochs` epochs."""

    epochs: int
    peak_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"the reference's schedule needs at least 1 epoch, got epochs={self.epochs}")

    def describe(self) -> str:
        return (f"SGD (Nesterov momentum {self.momentum}, weight decay {self.weight_decay:g}, batch "
                f"{self.batch_size}), one-cycle learning rate (peak {self.peak_lr:g}, {self.warmup:.0%} warm-up, "
                f"cosine annealing to ~0) over {self.epochs} epochs")


@dataclass
class ReferenceHistory:
    """Per epoch: the mean validation accuracy over the attributes and the learning rate of
    the epoch's last step; `converged` says whether the schedule ran to its end and its last epoch
    was within `tolerance` of the best mean validation accuracy (no longer learning)."""

    val_mean: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tolerance: float = 0.003

    @property
    def converged(self) -> bool:
        return bool(self.val_mean) and self.val_mean[-1] >= max(self.val_mean) - self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"val_mean": [round(v, 5) for v in self.val_mean], "lr": [float(f"{v:.3g}") for v in self.lr],
                "converged": self.converged, "tolerance": self.tolerance}


def train_reference(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    schedule: Schedule,
    *,
    seed: int = 0,
    augment: bool = True,
    eval_sets: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    model: nn.Module | None = None,
) -> tuple[TrainedAttack, ReferenceHistory]:
    """Train the reference over all attributes for exactly `schedule.epochs` epochs.

    x_*: float (N, C, H, W); y_*: 0/1 (N, A). Standardised with the train split's per-pixel
    mean and std; `augment`: random flips and ±4-pixel shifts of every train batch. Per
    attribute, the predictions on each `eval_sets` array are kept at that attribute's best
    validation epoch; the weights kept are those of the best mean validation accuracy.
    `log` gets one line per epoch. `model` replaces the `ReferenceResNet` (tests)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y_tr = np.asarray(y_tr).astype(np.int64)
    y_va = np.asarray(y_va).astype(np.int64)
    n_out = y_tr.shape[1]
    model = model if model is not None else ReferenceResNet(x_tr.shape[1:], n_out)
    model = model.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU
    mean, std = _standardiser(x_tr)
    bs = int(min(schedule.batch_size, max(8, len(x_tr) // 8)))
    steps_per_epoch = sum(1 for i in range(0, len(x_tr), bs) if min(bs, len(x_tr) - i) >= 2)
    decay, no_decay = [], []  # no weight decay on batch-norm scales and biases
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": schedule.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=schedule.peak_lr, momentum=schedule.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=schedule.peak_lr, total_steps=max(1, schedule.epochs * steps_per_epoch),
        pct_start=schedule.warmup, anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4,
        cycle_momentum=False)
    # summed over the attributes (mean over the batch): each attribute's head gets the gradient
    # a single-attribute classifier would, whatever the number of attributes
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    target_all = torch.from_numpy(y_tr.astype(np.float32))

    eval_sets = eval_sets or {}
    best_acc = np.full(n_out, -1.0)
    best_epoch = np.zeros(n_out, np.int64)
    selected = {k: np.zeros((len(v), n_out), np.int64) for k, v in eval_sets.items()}
    history = ReferenceHistory()
    best_mean, best_state, lr = -math.inf, None, schedule.peak_lr

    from tqdm import tqdm

    bar = tqdm(range(schedule.epochs), desc="raw-image reference", unit="ep", leave=False,
               disable=None if progress else True)
    for epoch in bar:
        model.train()
        perm = rng.permutation(len(x_tr))
        for i in range(0, len(perm), bs):
            idx = np.sort(perm[i:i + bs])
            if len(idx) < 2:
                continue  # BatchNorm needs more than one sample
            xb = _batch(x_tr, idx, mean, std)
            if augment:
                xb = flip_and_shift(xb, rng)
            xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            (loss_fn(model(xb), target_all[idx]) / len(idx)).backward()
            opt.step()
            lr = float(opt.param_groups[0]["lr"])  # the rate this step was taken with
            sched.step()
        pred_va = _predict(model, mean, std, x_va, True)
        acc = (pred_va == y_va).mean(0) if len(y_va) else np.zeros(n_out)
        best_acc, best_epoch = keep_better_columns(acc, best_acc, best_epoch, epoch, selected, eval_sets,
                                                   lambda xs: _predict(model, mean, std, xs, True))
        m = float(acc.mean())
        history.val_mean.append(m)
        history.lr.append(lr)
        bar.set_postfix(val=f"{m:.3f}")
        if log is not None:
            log(f"reference epoch {epoch + 1}/{schedule.epochs}: mean validation accuracy {m:.4f}, "
                f"learning rate {history.lr[-1]:.3g}")
        if m > best_mean:
            best_mean = m
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return (TrainedAttack("reference", model, mean, std, True, best_acc, best_epoch, len(history.val_mean), selected),
            history)
