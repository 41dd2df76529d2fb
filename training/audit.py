"""pric-audit: what can someone learn from what was released?

Audits a released model (ONNX + card), baseline obfuscations, or the features stored in
a live collector, with attackers trained fresh after the release is frozen (train split
0, selection on split 1, report on the identity-disjoint split 2):

    photos ─► preprocess (card) ─► release: ONNX features | obfuscated image
          ─► attribute inference (linear, MLP, CNN; private, primary, all attributes)
          ─► reconstruction (decoder; PSNR/SSIM) ─► classify-after-reconstruct
          ─► re-identification (nearest neighbour, rank-1/rank-5)
          ─► report.json, report.md, plane.png, reconstructions*.png

    pric-audit --model exported_models/pric-male --data DIR --private Male --primary Smiling --out DIR
    pric-audit --baselines all --data DIR --private Male --primary Smiling --out DIR
    pric-audit --collector URL --token T --model-id ID --probe DIR --private Male --out DIR

Exit codes: 0 ok (verdicts are in the report), 2 bad input, 4 model integrity/unknown
model, 6 auth, 9 collector unreachable, 1 other PRIC errors.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from protocol.errors import InvalidInputError, ModelIntegrityError, PricError
from protocol.model_card import InputSpec, ModelCard, load_card
from protocol.preprocess import normalize
from training.attacks import (
    ATTACKS,
    CORRELATED_PHI,
    applicable_kinds,
    check_trainable,
    create_attack,
    label_floor,
    majority_rate,
    multi_attribute_attack,
    phi,
    relative_gain,
    strongest_attack,
    train_attack,
)
from training.baselines import Baseline, parse_baselines
from training.data import TEST, TRAIN, VAL, FaceData, default_cache_dir, load_faces

REPORT_JSON = "report.json"
CONFIG_JSON = "audit_config.json"


# --- configuration -----------------------------------------------------------------------
@dataclass(frozen=True)
class AuditConfig:
    out: str
    private: str
    primary: tuple[str, ...] = ()
    model: str | None = None  # the audited model: the first of `models`
    models: tuple[str, ...] = ()
    data: str | None = None
    baselines: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ATTACKS
    compare: tuple[str, ...] = ()
    write_card: bool = False
    seed: int = 0
    quick: bool = False
    epochs: int = 15
    recon_epochs: int = 8
    limit: int | None = None
    split_file: str | None = None
    cache_dir: str | None = None
    min_class_samples: int = 5
    max_private_acc: float | None = None
    max_primary_drop: float = 0.05
    max_psnr: float = 20.0
    max_reid_rank1: float = 0.05
    dominance_tolerance: float | None = None  # None: one binomial standard error per axis
    no_reference: bool = False
    rerender: bool = False
    resume: bool = False
    progress: bool = True
    threads: int = 0
    baseline_epochs: int | None = None
    baseline_recon_epochs: int | None = None
    # live collector
    collector: str | None = None
    token: str | None = None
    model_id: str | None = None
    probe: str | None = None
    timeout: float = 30.0
    page_size: int = 200


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pric-audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", metavar="DIR",
                   help="exported model folder(s) (model.onnx + model_card.json). The first is the audited "
                        "model (headline, --write-card); more (the same method at other λ, a sparse_code "
                        "model) are audited with the same attacks and put on the privacy–utility plane")
    p.add_argument("--data", help="dataset folder (CelebA layout or images/ + labels.csv)")
    p.add_argument("--private", required=True, help="private attribute, e.g. Male")
    p.add_argument("--primary", default="", help="primary task attribute(s), comma-separated")
    p.add_argument("--out", required=True, help="output folder for the report")
    p.add_argument("--baseline", "--baselines", dest="baselines", default="",
                   help="baseline obfuscations to audit: 'all' or e.g. blur:7,scramble:8")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="attacker kinds (linear,mlp,cnn)")
    p.add_argument("--compare", nargs="*", default=[], help="other report.json files to put on the plane")
    p.add_argument("--write-card", action="store_true", help="write headline figures into the model card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few epochs (tests, smoke runs)")
    p.add_argument("--epochs", type=int, default=None, help="attacker epochs (default 15, quick 3)")
    p.add_argument("--recon-epochs", type=int, default=None, help="decoder epochs (default 8, quick 2)")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="attacker epochs for baselines (default: half of --epochs, at least 3)")
    p.add_argument("--baseline-recon-epochs", type=int, default=None,
                   help="decoder epochs for baselines (default: half of --recon-epochs, at least 1)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    p.add_argument("--split-file", default=None)
    p.add_argument("--cache-dir", default=None, help="cache of prepared photos and raw-image references")
    p.add_argument("--min-class-samples", type=int, default=5)
    p.add_argument("--max-private-acc", type=float, default=None,
                   help="verdict threshold on private leakage (default: 0.05 above the majority rate, or above "
                        "the label floor, the accuracy of predicting it from the true primary labels, if higher)")
    p.add_argument("--max-primary-drop", type=float, default=0.05, help="allowed utility drop vs raw images")
    p.add_argument("--max-psnr", type=float, default=20.0, help="reconstruction PSNR (dB) above this fails")
    p.add_argument("--max-reid-rank1", type=float, default=0.05, help="re-identification rank-1 above this fails")
    p.add_argument("--dominance-tolerance", type=float, default=None,
                   help="accuracy difference treated as a tie when checking that the models dominate the "
                        "baselines (default: one binomial standard error of the test split, per axis)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the releases an unfinished run with the same settings left in --out/report.json")
    p.add_argument("--rerender", action="store_true",
                   help="only re-write report.md and plots of an existing --out (e.g. with new --compare points)")
    p.add_argument("--no-reference", action="store_true", help="skip the raw-image reference classifier")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: all cores, or 1 when the machine is already busy)")
    p.add_argument("--collector", help="collector URL (live audit)")
    p.add_argument("--token", help="auditor token (live audit)")
    p.add_argument("--model-id", help="model id name@version (live audit)")
    p.add_argument("--probe", help="the auditor's own labelled probe set (live audit)")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    return p


def config_from_args(a: argparse.Namespace) -> AuditConfig:
    split = lambda s: tuple(v.strip() for v in s.split(",") if v.strip())  # noqa: E731
    return AuditConfig(
        out=a.out, private=a.private, primary=split(a.primary), model=a.model[0] if a.model else None,
        models=tuple(a.model or ()), data=a.data, dominance_tolerance=a.dominance_tolerance,
        baselines=split(a.baselines) if a.baselines.strip() != "all" else ("all",), attacks=split(a.attacks),
        compare=tuple(a.compare or ()), write_card=a.write_card, seed=a.seed, quick=a.quick,
        epochs=a.epochs if a.epochs is not None else (3 if a.quick else 15),
        recon_epochs=a.recon_epochs if a.recon_epochs is not None else (2 if a.quick else 8),
        limit=a.limit, split_file=a.split_file, cache_dir=a.cache_dir, min_class_samples=a.min_class_samples,
        max_private_acc=a.max_private_acc, max_primary_drop=a.max_primary_drop, max_psnr=a.max_psnr,
        max_reid_rank1=a.max_reid_rank1, no_reference=a.no_reference, rerender=a.rerender, resume=a.resume, progress=not a.no_progress, threads=a.threads,
        baseline_epochs=a.baseline_epochs, baseline_recon_epochs=a.baseline_recon_epochs,
        collector=a.collector, token=a.token, model_id=a.model_id, probe=a.probe, timeout=a.timeout,
    )


_T0 = time.time()


def _say(cfg: AuditConfig, msg: str) -> None:
    """Stage lines on stderr (kept with --no-progress, which only hides the bars)."""
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --- releases ------------------------------------------------------------------------------
class OnnxRelease:
    """The released ONNX model: uint8 pixels (N, H, W, 3) → float32 (N, *card.output.shape)."""

    def __init__(self, model_dir: Path, card: ModelCard, batch_size: int = 256) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / card.file), opts, providers=["CPUExecutionProvider"])
        self.card, self.batch_size = card, batch_size
        inp = self.session.get_inputs()[0]
        want = (3, card.input.height, card.input.width)
        got = tuple(inp.shape[1:])
        if len(got) != 3 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise ModelIntegrityError(
                f"{model_dir}: the model expects input {got} but its card states (3, {card.input.height}, {card.input.width})")
        self.input_name = inp.name
        names = [o.name for o in self.session.get_outputs()]
        self.output_name = card.output.name if card.output.name in names else names[0]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[1:3] != (self.card.input.height, self.card.input.width):
            raise InvalidInputError(
                f"photos are {pixels.shape[1]}x{pixels.shape[2]} but the model card states "
                f"{self.card.input.height}x{self.card.input.width}")
        out = []
        for i in range(0, len(pixels), self.batch_size):
            x = normalize(pixels[i:i + self.batch_size], self.card.input)
            out.append(self.session.run([self.output_name], {self.input_name: x})[0].astype(np.float32))
        feats = np.concatenate(out) if out else np.zeros((0, *self.card.output.shape), np.float32)
        if tuple(feats.shape[1:]) != tuple(self.card.output.shape):
            raise ModelIntegrityError(
                f"model {self.card.model_id}: output shape {tuple(feats.shape[1:])} does not match the card's "
                f"{tuple(self.card.output.shape)}")
        return feats


def normalized_images(pixels: np.ndarray, spec: InputSpec, dtype: Any = np.float16) -> np.ndarray:
    """uint8 (N, H, W, 3) → (N, 3, H, W) normalised like the model input (float16 to save memory)."""
    out = np.empty((len(pixels), 3, *pixels.shape[1:3]), dtype)
    for i in range(0, len(pixels), 1024):
        out[i:i + 1024] = normalize(pixels[i:i + 1024], spec)
    return out


def unit_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → float32 (N, 3, H, W) in [0, 1]."""
    return np.ascontiguousarray(np.moveaxis(pixels, -1, 1), dtype=np.float32) / 255.0


@dataclass
class Splits:
    tr: np.ndarray
    va: np.ndarray
    te: np.ndarray

    @classmethod
    def of(cls, data: FaceData, what: str) -> "Splits":
        s = cls(*(np.flatnonzero(data.splits == k) for k in (TRAIN, VAL, TEST)))
        for name, idx in (("train (0)", s.tr), ("validation (1)", s.va), ("test (2)", s.te)):
            if len(idx) == 0:
                raise InvalidInputError(f"{what}: the {name} split is empty; audits need train, validation and test")
        return s


# --- reconstruction --------------------------------------------------------------------------
class Decoder(nn.Module):
    """Inverts a representation: (B, *shape) → image (B, 3, H, W) in [0, 1].

        map (C, h, w) ─ conv (3x3, or 4x4 stride 4 for image-sized maps) ─┐
        other (D,…)   ─ flatten, linear → (32, H/8, W/8) ──────────────────────────┴► [transposed conv x2]* → conv → sigmoid

    Channels halve (32 → 8) as the map grows: small on purpose, several are trained per audit on CPU.
    """

    def __init__(self, shape: Sequence[int], out_hw: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        h_out, w_out = out_hw
        ch = width
        layers: list[nn.Module] = []
        if len(shape) == 3:
            c, h, _ = (int(v) for v in shape)
            if h > 16:
                layers += [nn.Conv2d(c, ch, 4, stride=4), nn.ReLU()]
                size = h // 4
            else:
                layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU()]
                size = h
        else:
            size = max(h_out // 8, 1)
            sw = max(w_out // 8, 1)
            layers += [nn.Flatten(), nn.Linear(int(np.prod(shape)), ch * size * sw), nn.ReLU(),
                       nn.Unflatten(1, (ch, size, sw))]
        while size < h_out:
            nxt = max(ch // 2, 8)
            # transposed convs: about 3x cheaper on CPU than bilinear upsampling + conv
            layers += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch, size = nxt, size * 2
        if size != h_out:
            layers.append(nn.Upsample(size=out_hw, mode="bilinear", align_corners=False))
        layers += [nn.Conv2d(ch, 3, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def train_decoder(x: np.ndarray, pixels: np.ndarray, sp: Splits, cfg: AuditConfig, what: str) -> np.ndarray:
    """Train a decoder on train, select on validation MSE; returns test reconstructions
    float32 (N_te, 3, H, W) in [0, 1]."""
    from tqdm import tqdm

    from training.attacks import _standardiser

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_tr = x[sp.tr]
    mean, std = _standardiser(x_tr)
    z = lambda idx_arr, src: (torch.from_numpy(np.ascontiguousarray(src[idx_arr], dtype=np.float32)) - mean) / std  # noqa: E731
    tgt = lambda idx_arr: torch.from_numpy(unit_images(pixels[idx_arr]))  # noqa: E731
    model = Decoder(x.shape[1:], pixels.shape[1:3])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    bs = int(min(64, max(8, len(sp.tr) // 20)))
    best, best_state = float("inf"), None
    for _ in tqdm(range(cfg.recon_epochs), desc=f"decoder on {what}", unit="ep", leave=False,
                  disable=None if cfg.progress else True):
        model.train()
        perm = rng.permutation(len(sp.tr))
        for i in range(0, len(sp.tr), bs):
            idx = np.sort(sp.tr[perm[i:i + bs]])
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((model(z(idx, x)) - tgt(idx)) ** 2)
            loss.backward()
            opt.step()
        val = _decode(model, x, sp.va, mean, std)
        mse = float(np.mean((val - unit_images(pixels[sp.va])) ** 2))
        if mse < best:
            best, best_state = mse, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return _decode(model, x, sp.te, mean, std)


@torch.no_grad()
def _decode(model: nn.Module, x: np.ndarray, idx: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    model.eval()
    out = [model((torch.from_numpy(np.ascontiguousarray(x[idx[i:i + 256]], dtype=np.float32)) - mean) / std).numpy()
           for i in range(0, len(idx), 256)]
    return np.concatenate(out) if out else np.zeros((0, 3, 1, 1), np.float32)


def image_quality(ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    """Mean PSNR/SSIM (data_range=1) over images; ref, rec float (N, 3, H, W) in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = [peak_signal_noise_ratio(r, c, data_range=1.0) for r, c in zip(ref, rec)]
    ssim = [structural_similarity(r, c, data_range=1.0, channel_axis=0) for r, c in zip(ref, rec)]
    return {"psnr": float(np.mean(psnr)), "psnr_std": float(np.std(psnr)),
            "ssim": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)), "n": int(len(ref))}


# --- re-identification ----------------------------------------------------------------------
def reidentification(x: np.ndarray, ids: np.ndarray, ref_mean: np.ndarray | None = None) -> dict[str, Any]:
    """Rank-1 / rank-5 of finding another photo of the same person by cosine nearest
    neighbour. x (N, ...) of one split; ids (N,) (-1 unknown). Queries are photos whose
    identity has at least 2 photos; the gallery is every other photo of the split."""
    ids = np.asarray(ids)
    known = ids >= 0
    counts = {i: c for i, c in zip(*np.unique(ids[known], return_counts=True))}
    queries = np.flatnonzero(known & np.array([counts.get(i, 0) >= 2 for i in ids], dtype=bool))
    if len(queries) == 0:
        return {"rank1": None, "rank5": None, "n_queries": 0, "chance_rank1": None}
    f = x.reshape(len(x), -1).astype(np.float32)
    f = f - (f.mean(0) if ref_mean is None else ref_mean.reshape(-1))
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-8
    hits1, hits5 = [], []
    for i in range(0, len(queries), 512):
        q = queries[i:i + 512]
        sim = f[q] @ f.T
        sim[np.arange(len(q)), q] = -np.inf
        top = np.argsort(-sim, axis=1)[:, :5]
        same = ids[top] == ids[q][:, None]
        hits1.append(same[:, 0])
        hits5.append(same.any(1))
    chance = float(np.mean([(counts[ids[q]] - 1) / (len(x) - 1) for q in queries]))
    return {"rank1": float(np.concatenate(hits1).mean()), "rank5": float(np.concatenate(hits5).mean()),
            "n_queries": int(len(queries)), "n_identities": int(sum(c >= 2 for c in counts.values())),
            "chance_rank1": chance}


# --- raw-image reference ----------------------------------------------------------------------
def raw_reference(data: FaceData, images: np.ndarray, sp: Splits, cfg: AuditConfig, spec: InputSpec) -> dict[str, Any]:
    """A CNN on raw images over all attributes (trained once; cached by data, normalisation,
    seed and epochs).

    Returns {"attributes", "accuracy": [..], "majority_rate": [..], "reid": {..},
    "classifier": TrainedAttack}. The classifier is reused for classify-after-reconstruct.
    """
    h = hashlib.sha256()
    h.update(str(Path(data.root).resolve()).encode())
    h.update("\n".join(data.filenames).encode())
    h.update(data.splits.tobytes())
    h.update(json.dumps([cfg.seed, cfg.epochs, list(data.attr_names), images.shape[1:], asdict(spec)]).encode())
    key = h.hexdigest()[:20]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    res_path, state_path = cache / f"audit-rawref-{key}.json", cache / f"audit-rawref-{key}.pt"
    n_attr = len(data.attr_names)
    model = create_attack("cnn", images.shape[1:], n_attr)
    if res_path.is_file() and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        model.eval()
        result = json.loads(res_path.read_text())
        from training.attacks import TrainedAttack

        result["classifier"] = TrainedAttack("cnn", model, saved["mean"], saved["std"], True,
                                             np.zeros(n_attr), np.zeros(n_attr, np.int64), 0)
        result["cached"] = True
        return result
    multi = multi_attribute_attack(images[sp.tr], data.labels[sp.tr], images[sp.va], data.labels[sp.va],
                                   images[sp.te], data.labels[sp.te], data.attr_names, kinds=("cnn",),
                                   seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                   what="raw images (reference)", return_models=True)
    fitted = multi.pop("models")["cnn"]
    result = {"attributes": multi["attributes"], "accuracy": multi["accuracy"],
              "majority_rate": multi["majority_rate"],
              "reid": reidentification(images[sp.te], data.identities[sp.te],
                                       images[sp.tr].astype(np.float32).mean(0))}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"model": fitted.model.state_dict(), "mean": fitted.mean, "std": fitted.std}, state_path)
        res_path.write_text(json.dumps(result))
    except OSError:
        pass  # a read-only cache only costs time
    result["classifier"] = fitted
    result["cached"] = False
    return result


# --- the harness ----------------------------------------------------------------------------
def audit_release(
    label: str, x: np.ndarray, data: FaceData, sp: Splits, cfg: AuditConfig, ref: dict[str, Any] | None,
    spec: InputSpec, full: bool, out_dir: Path,
) -> dict[str, Any]:
    """Every attack on one released representation x (N, *shape) aligned with `data`.

    `full` trains single-attribute attackers for the private and primary attributes; else
    those figures are read from the all-attribute heads (cheaper, used for baselines).
    """
    from training.report import save_grid

    t0 = time.time()
    kinds = applicable_kinds(cfg.attacks, x.shape[1:])
    L = data.labels
    res: dict[str, Any] = {"label": label, "shape": list(x.shape[1:]), "attacks": kinds}
    _say(cfg, f"[{label}] attribute inference on all {len(data.attr_names)} attributes")
    multi = multi_attribute_attack(x[sp.tr], L[sp.tr], x[sp.va], L[sp.va], x[sp.te], L[sp.te], data.attr_names,
                                   kinds=kinds, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                   what=f"{label}: all attributes")
    res["attributes"] = multi
    pi = data.attr_index(cfg.private)
    if full:
        _say(cfg, f"[{label}] private attribute {cfg.private}")
        res["private"] = strongest_attack(x[sp.tr], L[sp.tr, pi], x[sp.va], L[sp.va, pi], x[sp.te], L[sp.te, pi],
                                          kinds=kinds, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                          min_per_class=cfg.min_class_samples, what=cfg.private)
        # the all-attribute heads are attackers too: the strongest counts
        j_multi = multi["accuracy"][pi]
        res["private"]["multi_label"] = j_multi
        if j_multi > res["private"]["accuracy"]:
            res["private"]["accuracy"] = j_multi
            res["private"]["strongest"] = f"{multi['strongest'][pi]} (multi-label)"
        res["primary"] = {}
        for name in cfg.primary:
            j = data.attr_index(name)
            res["primary"][name] = strongest_attack(
                x[sp.tr], L[sp.tr, j], x[sp.va], L[sp.va, j], x[sp.te], L[sp.te, j], kinds=kinds, seed=cfg.seed,
                epochs=cfg.epochs, progress=cfg.progress, min_per_class=cfg.min_class_samples, what=name)
    else:
        res["private"] = _from_multi(multi, pi, kinds)
        res["primary"] = {n: _from_multi(multi, data.attr_index(n), kinds) for n in cfg.primary}
    # what the primary labels alone say about the private attribute: a release that keeps
    # the primary tasks cannot leak less (train -> test, majority per label combination)
    prim = [data.attr_index(n) for n in cfg.primary]
    res["private"]["label_floor"] = label_floor(L[sp.tr][:, prim], L[sp.tr, pi], L[sp.te][:, prim], L[sp.te, pi])

    _say(cfg, f"[{label}] reconstruction")
    rec = train_decoder(x, data.pixels, sp, cfg, label)
    ref_imgs = unit_images(data.pixels[sp.te])
    res["reconstruction"] = image_quality(ref_imgs, rec)
    grid = out_dir / f"reconstructions-{_slug(label)}.png"
    save_grid(ref_imgs[:8], rec[:8], grid, title=f"{label}: originals (top) vs reconstructions (bottom)")
    res["reconstruction"]["grid"] = grid.name
    if ref is not None:
        rec_in = normalize(np.moveaxis(np.clip(rec * 255.0 + 0.5, 0, 255).astype(np.uint8), 1, -1), spec) \
            if len(rec) else rec
        pred = ref["classifier"].predict(rec_in)
        car = (pred == L[sp.te]).mean(0)
        res["classify_after_reconstruct"] = {"accuracy": [float(v) for v in car]}
        res["private"]["reconstruct"] = float(car[pi])
        if res["private"]["reconstruct"] > res["private"]["accuracy"]:
            res["private"]["accuracy"], res["private"]["strongest"] = res["private"]["reconstruct"], "reconstruct"
    _say(cfg, f"[{label}] re-identification")
    res["reid"] = reidentification(x[sp.te], data.identities[sp.te], x[sp.tr].astype(np.float32).mean(0))
    res["primary_accuracy"] = float(np.mean([v["accuracy"] for v in res["primary"].values()])) if cfg.primary else None
    if ref is not None:
        res["other_attributes"] = other_attribute_utility(multi, ref, data, sp, cfg)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def other_attribute_utility(multi: dict[str, Any], ref: dict[str, Any], data: FaceData, sp: Splits,
                            cfg: AuditConfig) -> dict[str, Any]:
    """What the release keeps of the attributes it was not trained for: per attribute (not
    private, not primary) the share of the raw-image classifier's gain over the majority rate
    that the strongest multi-label head keeps, and the means over all of them, over those
    correlated with the private attribute (|phi| >= 0.3 on train) and over the others."""
    pi = data.attr_index(cfg.private)
    u = data.labels[sp.tr, pi]
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(data.attr_names):
        if name == cfg.private or name in cfg.primary:
            continue
        gain = relative_gain(multi["accuracy"][j], ref["accuracy"][j], multi["majority_rate"][j])
        if gain is not None:
            per[name] = {"relative": gain, "phi_private": abs(phi(data.labels[sp.tr, j], u))}
    mean = lambda keep: float(np.mean([v["relative"] for v in per.values() if keep(v)])) \
        if any(keep(v) for v in per.values()) else None  # noqa: E731
    return {"per_attribute": per, "mean": mean(lambda v: True),
            "mean_uncorrelated": mean(lambda v: v["phi_private"] < CORRELATED_PHI),
            "mean_correlated": mean(lambda v: v["phi_private"] >= CORRELATED_PHI),
            "n": len(per), "n_correlated": sum(v["phi_private"] >= CORRELATED_PHI for v in per.values())}


def _from_multi(multi: dict[str, Any], j: int, kinds: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: multi["per_kind"][k][j] for k in kinds}
    out.update(accuracy=multi["accuracy"][j], strongest=multi["strongest"][j],
               majority_rate=multi["majority_rate"][j], kinds=list(kinds), source="multi-label heads")
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label)


# --- verdicts ------------------------------------------------------------------------------
def verdicts(rel: dict[str, Any], cfg: AuditConfig, ref: dict[str, Any] | None, attr_names: list[str]) -> list[dict]:
    """Pass/fail against the auditor's thresholds; each {"check", "value", "threshold", "pass"}."""
    out = []
    priv = rel["private"]
    floor = max(priv["majority_rate"], priv.get("label_floor", 0.0))
    thr = cfg.max_private_acc if cfg.max_private_acc is not None else floor + 0.05
    out.append({"check": f"private {cfg.private}: strongest attacker accuracy ≤ threshold"
                         + ("" if cfg.max_private_acc is not None else " (label floor or majority rate + 0.05)"),
                "value": priv["accuracy"], "threshold": thr, "pass": priv["accuracy"] <= thr})
    if ref is not None:
        for name, v in rel["primary"].items():
            raw = ref["accuracy"][attr_names.index(name)]
            out.append({"check": f"primary {name}: accuracy ≥ raw-image accuracy − {cfg.max_primary_drop}",
                        "value": v["accuracy"], "threshold": raw - cfg.max_primary_drop,
                        "pass": v["accuracy"] >= raw - cfg.max_primary_drop})
    psnr = rel["reconstruction"]["psnr"]
    out.append({"check": "reconstruction PSNR (dB) ≤ threshold", "value": psnr, "threshold": cfg.max_psnr,
                "pass": psnr <= cfg.max_psnr})
    r1 = rel["reid"]["rank1"]
    if r1 is not None:
        out.append({"check": "re-identification rank-1 ≤ threshold", "value": r1, "threshold": cfg.max_reid_rank1,
                    "pass": r1 <= cfg.max_reid_rank1})
    return out


def headline(rel: dict[str, Any], cfg: AuditConfig, kind: str) -> dict[str, Any]:
    """The point of this release on the privacy–utility plane (also read by --compare)."""
    return {"label": rel["label"], "kind": kind, "private": cfg.private,
            "private_acc": rel["private"]["accuracy"], "primary_acc": rel.get("primary_accuracy"),
            "primary": list(cfg.primary), "majority_rate": rel["private"]["majority_rate"],
            "other_utility": (rel.get("other_attributes") or {}).get("mean")}


def _compare_points(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Points of other pric-audit reports: their audited models (kind 'compare', their own
    kind kept as 'source_kind') and their baselines (kind 'baseline'), so that a plane of
    several runs still shows, and checks dominance against, every baseline once."""
    points: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for p in paths:
        try:
            other = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"--compare {p}: cannot read a report ({exc})") from None
        h = other.get("headline")
        if not isinstance(h, dict) or "private_acc" not in h:
            raise InvalidInputError(f"--compare {p}: not a pric-audit report (no 'headline')")
        theirs = [q for q in other.get("points", []) if isinstance(q, dict) and q.get("kind") != "raw"
                  and "private_acc" in q] or [h]
        for q in theirs:
            if q.get("source"):  # a point that report itself imported: take it from its own report
                continue
            kind = "baseline" if q.get("kind") == "baseline" else "compare"
            key = (kind, str(q.get("label")))
            if key in seen:
                continue
            seen.add(key)
            points.append({**q, "kind": kind, "source_kind": q.get("source_kind", q.get("kind")), "source": str(p)})
    return points


# --- the audits ----------------------------------------------------------------------------
def _load_data(path: str, spec: InputSpec, cfg: AuditConfig) -> FaceData:
    data = load_faces(path, spec=spec, split_file=cfg.split_file, cache_dir=cfg.cache_dir, limit=cfg.limit,
                      progress=cfg.progress)
    for name in (cfg.private, *cfg.primary):
        data.attr_index(name)
    return data


def _check_classes(data: FaceData, sp: Splits, cfg: AuditConfig) -> None:
    for name in (cfg.private, *cfg.primary):
        check_trainable(data.attr(name)[sp.tr], f"attribute {name!r}", cfg.min_class_samples)


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run the audit the config asks for; writes the report files and returns report.json's dict."""
    if cfg.rerender:
        return rerender(cfg)
    if cfg.collector:
        return run_live_audit(cfg)
    if not cfg.data:
        raise InvalidInputError("--data is required (unless auditing a live collector with --collector)")
    if not cfg.model and not cfg.baselines:
        raise InvalidInputError("nothing to audit: give --model, --baselines, or --collector")
    if cfg.dominance_tolerance is not None and not 0.0 <= cfg.dominance_tolerance < 1.0:
        raise InvalidInputError(f"--dominance-tolerance {cfg.dominance_tolerance}: must be an accuracy "
                                "difference in [0, 1)")
    for kind in cfg.attacks:
        if kind not in ATTACKS:
            raise InvalidInputError(f"--attacks: unknown attack {kind!r}; valid attacks: {', '.join(ATTACKS)}")
    try:
        baselines = parse_baselines(",".join(cfg.baselines), cfg.seed) if cfg.baselines else []
    except ValueError as exc:
        raise InvalidInputError(f"--baselines: {exc}") from None
    compare = _compare_points(cfg.compare)
    models = _load_models(cfg)
    previous = _resumable(cfg)
    out_dir = _save_config(cfg)
    t0 = time.time()
    card = models[0][1] if models else None
    spec = card.input if card else InputSpec()
    data = _load_data(cfg.data, spec, cfg)
    sp = Splits.of(data, str(cfg.data))
    _check_classes(data, sp, cfg)
    report: dict[str, Any] = {
        "tool": "pric-audit", "config": _redacted(cfg),
        "setup": {"data": str(cfg.data), "n": len(data), "n_train": len(sp.tr), "n_val": len(sp.va),
                  "n_test": len(sp.te), "private": cfg.private, "primary": list(cfg.primary),
                  "attr_names": data.attr_names, "input": asdict(spec),
                  "model": card.to_dict() if card else None,
                  "models": [c.to_dict() for _, c in models]},
        "releases": [], "points": [],
    }
    ref = None
    if not cfg.no_reference:
        _say(cfg, "raw-image reference classifier")
        images = normalized_images(data.pixels, spec)
        ref = raw_reference(data, images, sp, cfg, spec)
        del images
        report["raw_reference"] = {k: v for k, v in ref.items() if k != "classifier"}
        pi = data.attr_index(cfg.private)
        report["points"].append({
            "label": "raw images", "kind": "raw", "private_acc": ref["accuracy"][pi],
            "primary_acc": float(np.mean([ref["accuracy"][data.attr_index(n)] for n in cfg.primary]))
            if cfg.primary else None})
    for model_dir, mcard in models:
        sparse_model = mcard.kind == "sparse_code"
        label, kind = (f"{mcard.model_id} ambiguated code", "sparse") if sparse_model else (mcard.model_id, "model")
        rel = previous.get(label)
        if rel is not None and rel.get("sha256") == mcard.sha256:
            _say(cfg, f"[{label}] reusing the figures of the unfinished run (--resume)")
            if sparse_model and "sparse" in previous:
                report["sparse"] = previous["sparse"]
        else:
            if sparse_model:
                from training import sparse_audit

                _say(cfg, f"sparse-code figures of {mcard.model_id} (authorised, JPEG, key attacks)")
                report["sparse"] = sparse_audit.audit_sparse(model_dir, Path(cfg.data), out_dir, cfg)
                _say(cfg, f"ambiguating the codes of {len(data)} photos with {mcard.model_id}")
                x = sparse_audit.ambiguated_codes(model_dir, mcard, data.pixels, cfg.seed)
            else:
                _say(cfg, f"transforming {len(data)} photos with {mcard.model_id}")
                x = OnnxRelease(model_dir, mcard)(data.pixels)
            rel = audit_release(label, x, data, sp, cfg, ref, spec, True, out_dir)
            del x
            rel["sha256"] = mcard.sha256
        rel["epochs"], rel["recon_epochs"] = cfg.epochs, cfg.recon_epochs
        rel["verdicts"] = verdicts(rel, cfg, ref, data.attr_names)
        rel["model_dir"], rel["model_id"] = str(model_dir), mcard.model_id
        report["releases"].append(rel)
        _checkpoint(report, out_dir)
        point = headline(rel, cfg, kind)
        point["model_id"], point["training"] = mcard.model_id, _training_summary(mcard)
        report.setdefault("headline", point)
        report["points"].append(point)
    bcfg = dataclasses.replace(
        cfg, epochs=cfg.baseline_epochs or max(3, cfg.epochs // 2),
        recon_epochs=cfg.baseline_recon_epochs or max(1, cfg.recon_epochs // 2))
    for b in baselines:
        rel = previous.get(b.label)
        if rel is not None and "baseline" in rel:
            _say(cfg, f"[{b.label}] reusing the figures of the unfinished run (--resume)")
        else:
            _say(cfg, f"baseline {b.label}")
            obf = b.apply(unit_images(data.pixels)).astype(np.float16)
            rel = audit_release(b.label, obf, data, sp, bcfg, ref, spec, False, out_dir)
            del obf
        rel["epochs"], rel["recon_epochs"] = bcfg.epochs, bcfg.recon_epochs
        rel["verdicts"] = verdicts(rel, cfg, ref, data.attr_names)
        rel["baseline"] = {"name": b.name, "k": b.k}
        report["releases"].append(rel)
        _checkpoint(report, out_dir)
        report["points"].append(headline(rel, cfg, "baseline"))
        if "headline" not in report:
            report["headline"] = headline(rel, cfg, "baseline")
    local = {p["label"] for p in report["points"] if p.get("kind") == "baseline"}
    report["points"] += [c for c in compare if not (c["kind"] == "baseline" and c["label"] in local)]
    report["dominance"] = dominance(report["points"], len(sp.te), cfg.dominance_tolerance)
    report["seconds"] = round(time.time() - t0, 1)
    _finish(report, cfg, out_dir)
    if cfg.write_card and card is not None:
        write_card_audit(Path(cfg.model), card, report)
    return report


def _load_models(cfg: AuditConfig) -> list[tuple[Path, ModelCard]]:
    """Load and verify (sha256) every --model card; all must read the photos the same way
    (one raw-image reference, one set of decoder targets)."""
    models = [(Path(m), load_card(Path(m))) for m in (cfg.models or ((cfg.model,) if cfg.model else ()))]
    if sum(c.kind == "sparse_code" for _, c in models) > 1:
        raise InvalidInputError("--model: give at most one sparse_code model per audit (audit others separately "
                                "and add them with --compare)")
    for model_dir, c in models[1:]:
        first_dir, first = models[0]
        if asdict(c.input) != asdict(first.input):
            raise InvalidInputError(
                f"--model {model_dir}: its card's input ({c.input.width}x{c.input.height}, crop {c.input.crop_box}) "
                f"differs from {first_dir}'s; audit it separately and add its report with --compare")
    return models


def _resumable(cfg: AuditConfig) -> dict[str, Any]:
    """With --resume: the releases (by label) of an unfinished report.json in --out that was
    made with the same settings, and its sparse figures under "sparse"; else {}."""
    path = Path(cfg.out) / REPORT_JSON
    if not cfg.resume or not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    same = lambda c: {k: v for k, v in json.loads(json.dumps(c)).items() if k != "resume"}  # noqa: E731
    if old.get("complete", True) or same(old.get("config", {})) != same(_redacted(cfg)):
        raise InvalidInputError(f"--resume: {path} is not an unfinished run with the same settings; "
                                "drop --resume or choose another --out")
    reuse: dict[str, Any] = {r["label"]: r for r in old.get("releases", []) if isinstance(r, dict) and "label" in r}
    if "sparse" in old:
        reuse["sparse"] = old["sparse"]
    return reuse


def _training_summary(card: ModelCard) -> dict[str, Any]:
    t = card.training or {}
    return {k: t[k] for k in ("method", "lambda", "adv_weight", "penalty_weight", "epochs", "seed") if k in t}


# --- dominance ---------------------------------------------------------------------------------
OURS = ("model", "sparse")


def dominance(points: Sequence[dict[str, Any]], n_test: int, tolerance: float | None = None) -> dict[str, Any]:
    """Is every baseline dominated on the privacy–utility plane by one of the audited models
    (kinds 'model'/'sparse', or --compare points that were models in their own report)?

    P dominates B strictly when P leaks no more (private_acc ≤) and keeps no less utility
    (primary_acc ≥). Accuracies on n_test photos carry a binomial error, so a second test
    treats differences within `tolerance` as ties (default: one standard error
    sqrt(p(1-p)/n_test) of B's figure on each axis)."""
    ours = [p for p in points if p.get("primary_acc") is not None and
            (p.get("kind") in OURS or (p.get("kind") == "compare" and p.get("source_kind") in OURS))]
    rows = []
    for b in points:
        if b.get("kind") != "baseline" or b.get("primary_acc") is None:
            continue
        bl, bu = float(b["private_acc"]), float(b["primary_acc"])
        tl = tolerance if tolerance is not None else math.sqrt(bl * (1 - bl) / max(n_test, 1))
        tu = tolerance if tolerance is not None else math.sqrt(bu * (1 - bu) / max(n_test, 1))
        strict = [p["label"] for p in ours if p["private_acc"] <= bl and p["primary_acc"] >= bu]
        tied = [p["label"] for p in ours if p["private_acc"] <= bl + tl and p["primary_acc"] >= bu - tu]
        rows.append({"baseline": b["label"], "private_acc": bl, "primary_acc": bu,
                     "tolerance": {"private": tl, "primary": tu},
                     "dominated_by": strict, "dominated_within_tolerance_by": tied})
    return {"n_models": len(ours), "baselines": rows,
            "all_dominated": bool(rows) and bool(ours) and all(r["dominated_by"] for r in rows),
            "all_dominated_within_tolerance": bool(rows) and bool(ours)
            and all(r["dominated_within_tolerance_by"] for r in rows),
            "tolerance": "one binomial standard error per axis" if tolerance is None else tolerance}


def rerender(cfg: AuditConfig) -> dict[str, Any]:
    """Re-write report.md/plane.png of an existing report, replacing its --compare points."""
    out_dir = Path(cfg.out)
    try:
        report = json.loads((out_dir / REPORT_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--rerender: {out_dir / REPORT_JSON} is not a readable report ({exc})") from None
    report["points"] = [p for p in report.get("points", []) if p.get("kind") != "compare" and not p.get("source")]
    report["points"] += _compare_points(cfg.compare)
    report["dominance"] = dominance(report["points"], int(report.get("setup", {}).get("n_test") or 0),
                                    cfg.dominance_tolerance)
    _finish(report, cfg, out_dir)
    return report


def _redacted(cfg: AuditConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if d.get("token"):
        d["token"] = "<redacted>"  # never write tokens
    return d


def _save_config(cfg: AuditConfig) -> Path:
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_JSON).write_text(json.dumps(_redacted(cfg), indent=2, sort_keys=True) + "\n")
    return out_dir


def _finish(report: dict[str, Any], cfg: AuditConfig, out_dir: Path) -> None:
    from training.report import write_report

    report["complete"] = True
    write_report(report, out_dir)
    _write_json(report, out_dir / REPORT_JSON)


def _checkpoint(report: dict[str, Any], out_dir: Path) -> None:
    """report.json with the releases audited so far ("complete": false): a long audit that
    fails or is stopped late keeps what it measured."""
    _write_json({**report, "complete": False}, out_dir / REPORT_JSON)


def _write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)  # readers never see half a file


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_card_audit(model_dir: Path, card: ModelCard, report: dict[str, Any]) -> Path:
    """Store the headline figures in the card's `audit` section (the sha256 is of model.onnx,
    so it stays valid)."""
    rel = report["releases"][0]
    ref = report.get("raw_reference")
    names = report["setup"]["attr_names"]
    audit = dict(card.audit)
    audit.update({
        "measured_by": "pric-audit",
        "date": time.strftime("%Y-%m-%d"),
        "data": Path(report["setup"]["data"]).name,
        "split": "test",
        "n_test": report["setup"]["n_test"],
        "private": {"attribute": report["setup"]["private"], "strongest_accuracy": rel["private"]["accuracy"],
                    "strongest": rel["private"]["strongest"], "majority_rate": rel["private"]["majority_rate"],
                    "label_floor": rel["private"].get("label_floor"),
                    "per_attack": {k: rel["private"][k] for k in (*rel["private"]["kinds"], "multi_label", "reconstruct")
                                   if k in rel["private"]},
                    "raw_image_accuracy": ref["accuracy"][names.index(report["setup"]["private"])] if ref else None},
        "primary": {n: {"accuracy": v["accuracy"],
                        "raw_image_accuracy": ref["accuracy"][names.index(n)] if ref else None}
                    for n, v in rel["primary"].items()},
        "reconstruction": {"psnr": rel["reconstruction"]["psnr"], "ssim": rel["reconstruction"]["ssim"]},
        "reid": {k: rel["reid"].get(k) for k in ("rank1", "rank5", "n_queries")},
        "reid_raw_pixels": {k: ref["reid"].get(k) for k in ("rank1", "rank5")} if ref else None,
    })
    new = dataclasses.replace(card, audit=audit).validate()
    return new.save(model_dir)


# --- live collector --------------------------------------------------------------------------
def _http_get(session: Any, url: str, cfg: AuditConfig, params: dict | None = None) -> Any:
    import requests

    from protocol.errors import ServerUnavailableError, error_from_json

    try:
        resp = session.get(url, params=params, timeout=cfg.timeout)
    except requests.RequestException as exc:
        raise ServerUnavailableError(f"{cfg.collector}: cannot reach the collector ({type(exc).__name__})") from None
    if resp.status_code != 200:
        try:
            body = resp.json()
        except ValueError:
            body = None
        raise error_from_json(resp.status_code, body if isinstance(body, dict) else None)
    return resp


def fetch_live(cfg: AuditConfig, model_dir: Path) -> tuple[ModelCard, list[dict[str, Any]]]:
    """Download the model card and file (sha256 verified) and every stored item of the model."""
    import requests

    from protocol import routes
    from protocol.model_card import CARD_FILE, sha256_bytes
    from protocol.wire import npy_to_array

    base = cfg.collector.rstrip("/")
    s = requests.Session()
    s.headers[routes.AUTH_HEADER] = routes.BEARER + (cfg.token or "")
    card_json = _http_get(s, base + routes.model_card_url(cfg.model_id), cfg).json()
    card = ModelCard.from_dict(card_json)
    data = _http_get(s, base + routes.MODEL_FILE, cfg, {"model_id": card.model_id}).content
    if sha256_bytes(data) != card.sha256:
        raise ModelIntegrityError(f"{cfg.collector}: downloaded model file does not match the card's sha256")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / card.file).write_bytes(data)
    (model_dir / CARD_FILE).write_text(card.to_json() + "\n")
    items: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = _http_get(s, base + routes.EXPORT, cfg, {"model_id": card.model_id, "offset": offset,
                                                       "limit": cfg.page_size}).json()
        for it in page.get("items", []):
            arrays = {k: npy_to_array(base64.b64decode(v), f"item {it.get('item_id')}: {k}")
                      for k, v in it.get("arrays", {}).items()}
            items.append({"item_id": it.get("item_id"), "participant": it.get("participant"),
                          "arrays": arrays, "labels": it.get("labels") or {}})
        nxt = page.get("next_offset")
        offset = int(nxt) if nxt is not None else None
    return card, items


def run_live_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Attack the features a collector stores, with attackers trained on the auditor's own
    labelled probe set transformed by the same public model."""
    for name, val in (("--token", cfg.token), ("--model-id", cfg.model_id), ("--probe", cfg.probe)):
        if not val:
            raise InvalidInputError(f"{name} is required for a live collector audit")
    out_dir = _save_config(cfg)
    t0 = time.time()
    _say(cfg, f"pulling {cfg.model_id} from {cfg.collector}")
    model_dir = out_dir / "model"
    card, items = fetch_live(cfg, model_dir)
    card = load_card(model_dir)
    if card.kind != "features":
        raise InvalidInputError(f"model {card.model_id}: live audits cover 'features' models (card kind {card.kind!r})")
    probe = _load_data(cfg.probe, card.input, cfg)
    sp = Splits.of(probe, str(cfg.probe))
    _check_classes(probe, sp, cfg)
    release = OnnxRelease(model_dir, card)
    xp = release(probe.pixels)
    name = card.output.name
    pulled = [it for it in items if name in it["arrays"]]
    xs = np.stack([it["arrays"][name].astype(np.float32) for it in pulled]) if pulled \
        else np.zeros((0, *card.output.shape), np.float32)
    if xs.shape[1:] != tuple(card.output.shape):
        raise ModelIntegrityError(f"collector items have shape {xs.shape[1:]} but the card states {card.output.shape}")
    y_pull = np.array([int(it["labels"].get(cfg.private, -1)) for it in pulled], dtype=np.int64)
    lab = y_pull >= 0
    pi = probe.attr_index(cfg.private)
    y = probe.labels[:, pi].astype(np.int64)
    kinds = applicable_kinds(cfg.attacks, xp.shape[1:])
    per: dict[str, Any] = {}
    for kind in kinds:
        fitted = train_attack(kind, xp[sp.tr], y[sp.tr], xp[sp.va], y[sp.va], seed=cfg.seed, epochs=cfg.epochs,
                              progress=cfg.progress, eval_sets={"probe_test": xp[sp.te], "pulled": xs},
                              desc=f"{kind} attack on {cfg.private}")
        pred_pull = fitted.selected["pulled"][:, 0]
        per[kind] = {
            "probe_test_accuracy": float((fitted.selected["probe_test"][:, 0] == y[sp.te]).mean()),
            "pulled_accuracy": float((pred_pull[lab] == y_pull[lab]).mean()) if lab.any() else None,
            "pulled_predicted_positive_rate": float(pred_pull.mean()) if len(pred_pull) else None,
        }
    best = max(kinds, key=lambda k: (per[k]["pulled_accuracy"] or 0.0, per[k]["probe_test_accuracy"]))
    report: dict[str, Any] = {
        "tool": "pric-audit", "mode": "live", "config": _redacted(cfg),
        "setup": {"collector": cfg.collector, "model_id": card.model_id, "probe": str(cfg.probe),
                  "private": cfg.private, "n_probe_train": len(sp.tr), "n_probe_val": len(sp.va),
                  "n_probe_test": len(sp.te), "model": card.to_dict()},
        "live": {
            "n_pulled": len(pulled), "n_participants": len({it["participant"] for it in pulled}),
            "n_labelled": int(lab.sum()), "per_attack": per, "strongest": best,
            "pulled_accuracy": per[best]["pulled_accuracy"],
            "probe_test_accuracy": max(v["probe_test_accuracy"] for v in per.values()),
            "pulled_majority_rate": majority_rate(y_pull[lab]) if lab.any() else None,
            "probe_majority_rate": majority_rate(y[sp.te]),
        },
        "releases": [], "points": [],
    }
    report["seconds"] = round(time.time() - t0, 1)
    _finish(report, cfg, out_dir)
    return report


# --- CLI ---------------------------------------------------------------------------------------
def set_threads(n: int) -> int:
    """Pick torch's CPU threads. With several busy processes on few cores, one thread per
    process is far faster (measured ~10x on a 2-core machine at load 10): spinning
    OpenMP workers fight over the cores."""
    import os

    cores = os.cpu_count() or 1
    if n <= 0:
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
        n = 1 if busy else cores
    torch.set_num_threads(n)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    set_threads(cfg.threads)
    try:
        report = run_audit(cfg)
    except PricError as exc:
        print(f"pric-audit: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    from training.report import summary_lines

    for line in summary_lines(report):
        print(line)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
