"""The raw-image reference (audit.reference via audit.harness.raw_reference): a residual
network trained with flips and shifts under a schedule that runs to its end, cached per data
set, and described in report.md."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from audit.config import AuditConfig
from audit.harness import REFERENCE_VERSION, raw_reference
from audit.reference import BasicBlock, ReferenceResNet, Schedule, train_reference
from audit.releases import Splits
from audit.report import _reference_md
from protocol.model_card import InputSpec

NAMES = ["Left", "Top"]


def _blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 16, 16) photos of one bright 2x2 blob, in the left or right quarter (Left) and
    the upper or lower quarter (Top): a horizontal flip turns a Left photo into a right one,
    so a network trained with flips cannot tell Left, while it can tell Top."""
    y = rng.integers(0, 2, (n, 2))
    x = rng.normal(0, 0.1, (n, 3, 16, 16)).astype(np.float32)
    for i, (left, top) in enumerate(y):
        r = rng.integers(1, 3) if top else rng.integers(12, 14)
        c = rng.integers(1, 3) if left else rng.integers(12, 14)
        x[i, :, r:r + 2, c:c + 2] += 3.0
    return x, y


def _data(tmp_path: Path) -> tuple[SimpleNamespace, np.ndarray, Splits]:
    rng = np.random.default_rng(0)
    n_tr, n_va, n_te = 160, 64, 64
    x, y = _blobs(n_tr + n_va + n_te, rng)
    splits = np.repeat([0, 1, 2], [n_tr, n_va, n_te]).astype(np.int64)
    n = len(x)
    data = SimpleNamespace(root=str(tmp_path), filenames=[f"{i:04d}.jpg" for i in range(n)], splits=splits,
                           attr_names=NAMES, labels=y, identities=np.arange(n))
    sp = Splits(*(np.flatnonzero(splits == k) for k in (0, 1, 2)))
    return data, x.astype(np.float16), sp


def _single_view(fitted, x: np.ndarray) -> np.ndarray:
    """Predicted labels of the reference from each photo alone, without its mirror image (the
    reference reads both in use, which would hide whether it was trained with flips)."""
    m = fitted.model.eval()
    with torch.no_grad():
        z = (torch.from_numpy(x.astype(np.float32)) - fitted.mean) / fitted.std
        return (m.head(m.stages(m.stem(z))) > 0).long().numpy()


def test_the_reference_is_a_residual_network_over_every_attribute() -> None:
    net = ReferenceResNet((3, 64, 64), 40)

    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 40)
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 6
    assert "resnet" in REFERENCE_VERSION


@pytest.mark.slow
def test_reference_trains_with_flips_and_runs_its_schedule_to_the_end(tmp_path: Path) -> None:
    data, images, sp = _data(tmp_path)
    epochs = 4
    cfg = AuditConfig(out=str(tmp_path), private="Top", reference_epochs=epochs, cache_dir=str(tmp_path / "cache"),
                      progress=False).resolved()

    ref = raw_reference(data, images, sp, cfg, InputSpec(height=16, width=16))

    x_te, y_te = images[sp.te], data.labels[sp.te]
    # learnt what a flip keeps, and could not learn what a flip reverses: trained with flips
    assert ref["accuracy"][NAMES.index("Top")] >= 0.9
    assert (_single_view(ref["classifier"], x_te)[:, 0] == y_te[:, 0]).mean() <= 0.75
    # the whole schedule ran: every epoch, the learning rate annealed to ~0 at the end
    assert ref["epochs_run"] == ref["max_epochs"] == epochs
    assert len(ref["history"]["val_mean"]) == len(ref["history"]["lr"]) == epochs
    assert ref["history"]["lr"][-1] < Schedule(epochs).peak_lr / 1000 < max(ref["history"]["lr"])
    assert ref["model"].startswith("ResNet") and "flips" in ref["model"] and isinstance(ref["converged"], bool)

    # the same network without flips learns Left easily: the check above does tell the two apart
    x_tr, x_va = images[sp.tr].astype(np.float32), images[sp.va].astype(np.float32)
    plain, _ = train_reference(x_tr, data.labels[sp.tr], x_va, data.labels[sp.va], Schedule(epochs), augment=False,
                               progress=False)
    assert (_single_view(plain, x_te)[:, 0] == y_te[:, 0]).mean() >= 0.9

    # cached per data set: the second audit reuses the trained reference
    again = raw_reference(data, images, sp, cfg, InputSpec(height=16, width=16))
    assert again["cached"] and again["key"] == ref["key"] and again["accuracy"] == ref["accuracy"]
    assert np.array_equal(again["classifier"].predict(x_te), ref["classifier"].predict(x_te))


def test_report_says_what_the_reference_is_and_how_far_it_was_trained() -> None:
    s = {"private": "Male", "attr_names": ["Male", "Smiling"], "n_test": 1000}
    ref = {"model": "ResNet (2-2-2 basic blocks, widths 32-64-128), random flips and ±4-pixel shifts",
           "schedule": "SGD, one-cycle over 20 epochs", "epochs_run": 20, "max_epochs": 20, "converged": True,
           "history": {"tolerance": 0.003}, "accuracy": [0.95, 0.9]}

    (line,) = _reference_md(ref, s)

    assert "ResNet" in line and "one-cycle over 20 epochs" in line and "20 of 20 epochs run, converged" in line
    assert "share of the raw-image gain" in line
    assert "Male 0.950 [0.935, 0.962]" in line and "mean over the 2 attributes 0.925" in line
    (line,) = _reference_md({**ref, "converged": False}, s)
    assert "**not converged**" in line
    old = {k: v for k, v in ref.items() if k not in ("converged", "schedule", "history")}  # an earlier report
    assert "stopped at its epoch cap" in _reference_md(old, s)[0]
    assert _reference_md(None, s) == []


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_reference_epochs_must_be_positive(bad: str) -> None:
    from audit.config import build_parser, config_from_args
    from protocol.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=f"--reference-epochs {bad}: must be at least 1"):
        config_from_args(build_parser().parse_args(["--out", "o", "--private", "Male", "--reference-epochs", bad]))
    with pytest.raises(ValueError, match="at least 1 epoch"):
        Schedule(int(bad))


def test_cached_results_are_keyed_by_the_photos_themselves_not_only_their_names(tmp_path: Path):
    """A data set made again under the same names (research.scenes celeba into the same
    folder) must not be answered from the last one's cached baselines or reference."""
    from audit.harness import baseline_cache_key, photos_hash
    from protocol.model_card import InputSpec

    data, x, _ = _data(tmp_path)
    data.pixels = np.zeros((len(data.filenames), 4, 4, 3), np.uint8)
    cfg = AuditConfig(out=str(tmp_path), private=NAMES[0])
    key = baseline_cache_key("blur:7", data, cfg, None, InputSpec())
    assert baseline_cache_key("blur:7", data, cfg, None, InputSpec()) == key
    again = SimpleNamespace(**{**vars(data), "pixels": data.pixels.copy()})
    again.pixels[3, 1, 1, 0] = 1
    assert baseline_cache_key("blur:7", again, cfg, None, InputSpec()) != key
    assert photos_hash(data, x).hexdigest() != photos_hash(data, x[::-1]).hexdigest()
