"""pric-train: adversarial training of the PRIC feature extractor (paper Eq. 6) and the
variants of issue 3 (`pric-train features`; `pric-train sparse` is training.sparse.train).

Players and optimizers (Adam, weight decay), all stepped once per batch:
  extractor E_φ      minimises  w_adv·A(adv(z), u) − λ·I_JSD(x; z, u) + w_p·BCE(head(z), y) + w_pen·P(z, u, y)
  adversaries ψ      minimise   BCE(adv(z.detach()), u)   [× adv_steps]
  MI net T_ω + heads maximise   I_JSD,   minimise BCE(head(z.detach()), y)
A is the method's adversarial term: `paper` −BCE (Eq. 3), `entropy` KL(adv || p(u | y)).
One forward of E serves every player: gradients are routed (scale_grad, autograd.grad on
z) so E is run backwards once per step; see benchmarks/bench_train.py.

Method = '+'-joined parts, e.g. `entropy+multi+mmd+leace` (see METHOD_PARTS).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from protocol.align import ALIGN_HELP
from protocol.config import add_options, csv_names, from_namespace, option
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import InputSpec
from training import losses
from protocol.datasets import (FaceData, check_class_counts, default_crop_box, default_data_dir, load_faces,
                               parse_crop_box)
from training import recipes
from training.data import pick_device, to_input
from training.models import create_model
from training.models.extractor import ARCHS, Extractor
from training.models.layers import scale_grad

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SPLIT = "split.txt"
R = recipes.recipe()  # the default recipe's settings: TrainConfig's defaults
# the defaults of runs written before the recipe became the default (their config.json may
# lack a field that was added later, e.g. `arch` before patch bodies existed)
LEGACY_DEFAULTS: dict[str, Any] = {"method": "entropy", "adv_weight": 1.0, "penalty_weight": 1.0, "lam": 0.1,
                                   "arch": "base", "width": 32, "epochs": 10, "primary": ("Smiling", "Heavy_Makeup")}

METHOD_PARTS: dict[str, str] = {
    "paper": "adversarial term −BCE of the adversary (paper Eq. 3); task-agnostic (no primary loss on E)",
    "entropy": "adversarial term KL(adversary || p(u | primary labels)): max-entropy, no label-flip exploit",
    "plain": "no adversarial term (a non-private baseline extractor)",
    "multi": "three co-trained adversaries (CNN, MLP, linear); the term averages them",
    "steps": "5 adversary steps per extractor step",
    "reinit": "re-initialise the adversaries (and their optimizer) every 100 steps",
    "mmd": "penalty: MMD² between the feature distributions of the private classes within primary-label strata",
    "dcor": "penalty: distance correlation of z and u within primary-label strata",
    "noise": "stochastic features: per-channel Gaussian noise with learned scale (training only)",
    "relnoise": "the learned noise of `noise` kept at inference too: a stochastic release (not exportable with a parity check)",
    "narrow": "narrow bottleneck: 4 feature channels instead of 16",
    "leace": "closed-form LEACE erasure of the private attributes, fitted on the train split after training, baked into the graph",
    "odds": "an adversary on the primary heads' logits and the true primary labels: heads and extractor are trained so that "
            "the decisions say nothing about u beyond the labels (equalised odds; adversarial term as `entropy`, weight "
            "--adv-weight)",
    "decision": "decision release: the exported model outputs only the primary heads' 0/1 decisions, (T, 1, 1), on the "
                "extractor body's map (before noise and eraser); training is unchanged",
}
_ADV_TERMS = ("paper", "entropy", "plain")


@dataclass(frozen=True)
class Method:
    """Parsed `--method`: which adversarial term and which extras."""

    term: str = "entropy"
    n_adversaries: int = 1
    adv_steps: int = 1
    reinit_every: int = 0
    penalty: str = ""
    stochastic: bool = False
    release_noise: bool = False
    narrow: bool = False
    leace: bool = False
    odds: bool = False
    decision: bool = False


def parse_method(text: str) -> Method:
    """'entropy+multi+leace' -> Method. Unknown parts raise ValueError listing valid ones."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    unknown = [p for p in parts if p not in METHOD_PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown method part(s) {unknown or [text]!r}; valid: {', '.join(METHOD_PARTS)} (join with '+')")
    terms = [p for p in parts if p in _ADV_TERMS]
    if len(terms) > 1:
        raise ValueError(f"method {text!r} names more than one adversarial term of {', '.join(_ADV_TERMS)}")
    penalties = [p for p in parts if p in ("mmd", "dcor")]
    return Method(
        term=terms[0] if terms else "plain",
        n_adversaries=3 if "multi" in parts else 1,
        adv_steps=5 if "steps" in parts else 1,
        reinit_every=100 if "reinit" in parts else 0,
        penalty="+".join(penalties),
        stochastic="noise" in parts or "relnoise" in parts,
        release_noise="relnoise" in parts,
        narrow="narrow" in parts,
        leace="leace" in parts,
        odds="odds" in parts,
        decision="decision" in parts,
    )


ARCH_HELP = ("extractor body (training/models/extractor.py): base (3 convs before the feature conv); lite (2); "
             "fast (the third with stride 2); patch (a 4x4 stride-4 stem: the cheapest on device, pric-male@5's)")


@dataclass(frozen=True)
class TrainConfig:
    """`pric-train features`: every option declared here once (protocol.config); saved as
    the run's config.json."""

    out: str = option(help="run folder: config.json, metrics.jsonl, checkpoint.pt, split.txt")
    data: str = option(None, "dataset folder (CelebA or images/+labels.csv; default: $PRIC_DATA, else "
                             "../shared/data/celeba-10k)")
    private: tuple[str, ...] = option(("Male",), "private attribute(s), comma-separated", parse=csv_names,
                                      default_arg="Male")
    primary: tuple[str, ...] = option(("Smiling",), "primary task attribute(s), comma-separated",
                                      parse=csv_names, default_arg="Smiling")
    lam: float = option(R["lam"], "weight of the JSD MI term (paper λ)", flags=("--lambda",), type=float)
    epochs: int = option(R["epochs"], "training epochs", type=int)
    method: str = option(R["method"], f"'+'-joined parts of: {', '.join(METHOD_PARTS)}")
    seed: int = option(0, "random seed", type=int)
    device: str = option("auto", "auto (cuda when available), cpu or cuda")
    batch_size: int = option(128, "batch size", type=int)
    lr: float = option(1e-3, "Adam learning rate", type=float)
    weight_decay: float = option(1e-4, "Adam weight decay", type=float)
    adv_weight: float = option(R["adv_weight"], "weight of the adversarial term", type=float)
    primary_weight: float = option(1.0, "weight of the primary heads' loss", type=float)
    penalty_weight: float = option(R["penalty_weight"], "weight of mmd/dcor penalties", type=float)
    width: int = option(R["width"], "channels of the extractor body", type=int)
    feat_channels: int = option(16, "channels of the released feature map", type=int)
    arch: str = option(R["arch"], ARCH_HELP, choices=ARCHS)
    max_batches: int = option(0, "cap batches per epoch (smoke tests)", type=int)
    limit: int = option(0, "use only the first N images (smoke tests)", type=int)
    split_file: str | None = option(None, "file of 'filename split' lines (0 train, 1 validation, 2 test) that "
                                          "overrides the data's split (default: the data's, or the one every tool "
                                          "derives where it has none)")
    crop_box: str | None = option(None, "input crop left,top,right,bottom, relative to the photo (default: CelebA's "
                                        "face box for the CelebA layout; for images/+labels.csv the crop_box of "
                                        "dataset.json beside it, else the whole photo 0,0,1,1)")
    size: int = option(64, "input height and width in pixels", type=int)
    align: str | None = option(None, ALIGN_HELP)
    min_class_photos: int = option(5, "fewest photos of each class of a private or primary attribute in the "
                                      "train split (the private attribute also needs 2 in validation)", type=int)
    audit: bool = option(False, "after training, a quick fresh-attacker check of the private attribute on the "
                                "validation split (check.json); pric-audit gives the full verdict")
    mode: str = "pric"
    input: InputSpec = field(default_factory=InputSpec)
    recipe: str = ""  # recorded: the recipe the run's settings are, or differ from (training/recipes.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # drops run outputs (erase_rank, wall time)
        d = {**LEGACY_DEFAULTS, **d}  # a field an older run lacks had the default of its time
        spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("input", {}).items()})
        tuples = {k: tuple(d[k]) for k in ("private", "primary") if k in d}
        return cls(**{**d, **tuples}, input=spec)


def load_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise InvalidInputError(f"{run_dir}: no {CONFIG} (not a pric-train run folder)")
    return TrainConfig.from_dict(json.loads(path.read_text()))


# --- models --------------------------------------------------------------------------

def build_extractor(cfg: TrainConfig, erase_rank: int = 0) -> Extractor:
    m = parse_method(cfg.method)
    return create_model(
        "extractor", width=cfg.width, feat_channels=4 if m.narrow else cfg.feat_channels,
        input_size=(cfg.input.height, cfg.input.width), stochastic=m.stochastic, erase_rank=erase_rank,
        release_noise=m.release_noise, arch=cfg.arch,
    )


class DecisionRelease(nn.Module):
    """What a `decision` run releases: the co-trained primary heads' hard decisions on the
    extractor body's map, (B, 3, H, W) -> float 0/1 (B, T, 1, 1); nothing else leaves."""

    def __init__(self, extractor: Extractor, heads: nn.Module, n_tasks: int) -> None:
        super().__init__()
        self.extractor, self.heads = extractor, heads
        self.feature_shape = (n_tasks, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.heads(self.extractor.body(x))
        return (logits > 0).to(logits.dtype).reshape(-1, *self.feature_shape)


def load_extractor(run_dir: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The trained release model of a run, in eval mode, from checkpoint.pt (weights_only):
    the extractor, or for a `decision` method its DecisionRelease."""
    cfg = load_config(run_dir)
    ckpt = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)
    state = ckpt["extractor"]
    model = build_extractor(cfg, erase_rank=int(state["eraser.a"].shape[1]))
    model.load_state_dict(state)
    if not parse_method(cfg.method).decision:
        return model.eval(), cfg
    heads = _primary_heads(model.feature_shape, len(cfg.primary))
    heads.load_state_dict(ckpt["heads"])
    return DecisionRelease(model, heads, len(cfg.primary)).eval(), cfg


def _adversaries(n: int, feat_shape: tuple[int, int, int], n_out: int) -> nn.ModuleList:
    c, h, w = feat_shape
    kinds = [("conv_head", dict(in_channels=c, n_out=n_out, feature_hw=(h, w))),
             ("mlp_head", dict(in_dim=c * h * w, n_out=n_out)),
             ("linear_head", dict(in_dim=c * h * w, n_out=n_out))]
    return nn.ModuleList(create_model(name, **kw) for name, kw in kinds[:n])


def _primary_heads(feat_shape: tuple[int, int, int], n_primary: int) -> nn.Module:
    """The co-trained primary-task heads: (B, C, h, w) feature map -> (B, P) logits."""
    return create_model("conv_head", in_channels=feat_shape[0], n_out=n_primary, feature_hw=feat_shape[1:])


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


# --- data ----------------------------------------------------------------------------

@torch.no_grad()
def extract_features(model: nn.Module, pixels: np.ndarray, spec: InputSpec, device: torch.device | str = "cpu",
                     batch: int = 256) -> np.ndarray:
    """Features (N, C, h, w) float32 of prepared pixels (N, H, W, 3), model in eval mode."""
    model.eval()
    out = [model(to_input(pixels[i:i + batch], spec, device)).float().cpu() for i in range(0, len(pixels), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


def label_prior_table(u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """p(u_k = 1 | primary-label combination), Laplace-smoothed: (2**P, K)."""
    keys = _keys(y)
    table = np.zeros((2 ** y.shape[1], u.shape[1]), np.float32)
    for key in range(len(table)):
        sel = keys == key
        table[key] = (u[sel].sum(0) + 1) / (sel.sum() + 2)
    return table


def _keys(y: np.ndarray) -> np.ndarray:
    return (y.astype(np.int64) * (2 ** np.arange(y.shape[1]))).sum(1)


# --- training ------------------------------------------------------------------------

class Trainer:
    """Holds the players and does one PRIC step per batch (`step`)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, prior_table: np.ndarray) -> None:
        self.cfg, self.device, self.method = cfg, device, parse_method(cfg.method)
        k, p = len(cfg.private), len(cfg.primary)
        self.extractor = build_extractor(cfg).to(device)
        shape = self.extractor.feature_shape
        self.adversaries = _adversaries(self.method.n_adversaries, shape, k).to(device)
        self.heads = _primary_heads(shape, p).to(device)
        self.mi = create_model("mi", feat_channels=shape[0], n_private=k).to(device)
        self.prior_table = torch.as_tensor(prior_table, device=device)
        self.opt_e = self._adam(self.extractor.parameters())
        # `odds`: a small MLP reading (head logits, true primary labels) -> private logits
        self.odds = nn.Sequential(nn.Linear(2 * p, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                  nn.Linear(64, k)).to(device) if self.method.odds else None
        adv_params = list(self.adversaries.parameters()) + (list(self.odds.parameters()) if self.odds else [])
        self.opt_adv = self._adam(adv_params)
        self.opt_aux = self._adam(list(self.mi.parameters()) + list(self.heads.parameters()))
        self.amp = device.type == "cuda"
        self.steps = 0
        # `paper` is task-agnostic: the heads only monitor utility, E gets no primary loss
        self.primary_weight = 0.0 if self.method.term == "paper" else cfg.primary_weight

    def _adam(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"extractor": self.extractor, "adversaries": self.adversaries, "heads": self.heads, "mi": self.mi}
        return {**mods, "odds": self.odds} if self.odds is not None else mods

    def train_mode(self) -> None:
        for m in self.modules().values():
            m.train()

    def step(self, x: torch.Tensor, u: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One step on a batch: x (B, 3, H, W), u (B, K) private, y (B, P) primary labels."""
        m, cfg = self.method, self.cfg
        if m.reinit_every and self.steps and self.steps % m.reinit_every == 0:
            _reset(self.adversaries)
            self.opt_adv = self._adam(list(self.adversaries.parameters())
                                      + (list(self.odds.parameters()) if self.odds else []))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            z = self.extractor(x)
            terms: dict[str, torch.Tensor] = {}
            total = z.new_zeros((), dtype=torch.float32)
            if m.term != "plain" and cfg.adv_weight:
                # E's adversarial gradient goes through the adversaries without touching their grads
                logits = [a(z) for a in self.adversaries]
                if m.term == "paper":
                    term = sum(losses.negative_ce(l, u) for l in logits) / len(logits)
                else:
                    prior = self.prior_table[torch.as_tensor(_keys_t(y), device=y.device)]
                    term = sum(losses.kl_to_prior(l, prior) for l in logits) / len(logits)
                (g_z,) = torch.autograd.grad(cfg.adv_weight * term, z, retain_graph=True)
                total = total + (z.float() * g_z.float()).sum()
                terms["adv_term"] = term.detach()
            zd = z.detach()
            adv_ce = sum(losses.bce(a(zd), u) for a in self.adversaries)
            x_code = self.mi.encode_x(x)
            z_mi = scale_grad(z, cfg.lam)  # T maximises with weight 1, E with λ
            perm = torch.randperm(len(x), device=x.device)
            jsd = losses.jsd_mi(self.mi(x_code, z_mi, u), self.mi(x_code[perm], z_mi, u))
            head_logits = self.heads(scale_grad(z, self.primary_weight))
            primary = losses.bce(head_logits, y)
            total = total + adv_ce - jsd + primary
            if self.odds is not None:
                # heads (and E, scaled by the primary weight) are pushed so that the odds
                # adversary, which also sees the true labels, is left at p(u | y) ...
                yf = y.to(head_logits.dtype)
                prior = self.prior_table[torch.as_tensor(_keys_t(y), device=y.device)]
                odds_term = losses.kl_to_prior(self.odds(torch.cat([head_logits, yf], 1)), prior)
                (g_h,) = torch.autograd.grad(cfg.adv_weight * odds_term, head_logits, retain_graph=True)
                total = total + (head_logits.float() * g_h.float()).sum()
                # ... while the adversary itself learns on detached logits
                odds_ce = losses.bce(self.odds(torch.cat([head_logits.detach(), yf], 1)), u)
                total = total + odds_ce
                terms.update(odds_term=odds_term.detach(), odds_ce=odds_ce.detach())
            terms.update(adv_ce=adv_ce.detach(), jsd=jsd.detach(), primary_bce=primary.detach())
            if m.penalty and cfg.penalty_weight:
                pen = z.new_zeros((), dtype=torch.float32)
                if "mmd" in m.penalty:
                    pen = pen + losses.conditional_mmd(z, u, y)
                if "dcor" in m.penalty:
                    pen = pen + losses.distance_correlation(z, u, y)
                total = total + cfg.penalty_weight * pen
                terms["penalty"] = pen.detach()
        for opt in (self.opt_e, self.opt_adv, self.opt_aux):
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in (self.opt_e, self.opt_adv, self.opt_aux):
            opt.step()
        for _ in range(m.adv_steps - 1):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                extra = sum(losses.bce(a(zd), u) for a in self.adversaries)
            self.opt_adv.zero_grad(set_to_none=True)
            extra.backward()
            self.opt_adv.step()
        self.steps += 1
        return {k: float(v) for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, x_all: np.ndarray, u: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Val accuracy of the co-trained adversaries and primary heads, eval mode."""
        for mod in self.modules().values():
            mod.eval()
        feats = torch.as_tensor(extract_features(self.extractor, x_all, self.cfg.input, self.device)).to(self.device)
        out: dict[str, float] = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for i, adv in enumerate(self.adversaries):
                pred = (adv(feats).float() > 0).cpu().numpy()
                for k, name in enumerate(self.cfg.private):
                    out[f"val_adv{i}_{name}"] = float((pred[:, k] == u[:, k]).mean())
            pred = (self.heads(feats).float() > 0).cpu().numpy()
        for k, name in enumerate(self.cfg.primary):
            out[f"val_{name}"] = float((pred[:, k] == y[:, k]).mean())
        return out


def _keys_t(y: torch.Tensor) -> torch.Tensor:
    return (y.long() * (2 ** torch.arange(y.shape[1], device=y.device))).sum(1)


def attrs(data: FaceData, names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) int64 labels."""
    return np.stack([data.attr(n) for n in names], axis=1) if names else np.zeros((len(data), 0), np.int64)


def prepare_data(cfg: TrainConfig, data: FaceData | None = None, progress: bool = True) -> FaceData:
    """The run's photos, their split printed and checked before any training: train and
    validation photos exist and every class of the private and primary attributes is seen."""
    if data is None:
        from protocol.align import training_aligner

        data = load_faces(cfg.data, cfg.input, split_file=cfg.split_file, limit=cfg.limit or None, progress=progress,
                          announce=False, aligner=training_aligner(cfg.align))
    print(data.split_summary(), flush=True)
    for name in (*cfg.private, *cfg.primary):
        data.attr_index(name)
    tr, va = data.split_sizes()[:2]
    where = cfg.split_file or cfg.data
    if tr == 0:
        raise InvalidInputError(f"{where}: the train split is empty ({data.split_source})")
    if va == 0:
        # never train on everything and report validation figures of the training photos
        raise InvalidInputError(f"{where}: the validation split is empty ({data.split_source}); give photos split 1 "
                                "or a --split-file")
    check_class_counts(data, (*cfg.private, *cfg.primary), "train", cfg.min_class_photos)
    # the validation figures of the private attribute (co-trained adversaries, --audit) need both classes
    check_class_counts(data, cfg.private, "val", min(2, cfg.min_class_photos))
    return data


def train(cfg: TrainConfig, data: FaceData | None = None, progress: bool = True) -> Path:
    """Train per `cfg`; writes config.json, split.txt, metrics.jsonl and checkpoint.pt into
    cfg.out (test photos are never read)."""
    method = parse_method(cfg.method)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    data = prepare_data(cfg, data, progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # the split beside the run: `pric-audit --split-file RUN/split.txt` reads it back
    data.write_split(out / SPLIT)
    tr, va = data.subset("train"), data.subset("val")
    u_tr, y_tr = attrs(tr, cfg.private), attrs(tr, cfg.primary)
    u_va, y_va = attrs(va, cfg.private), attrs(va, cfg.primary)
    (out / CONFIG).write_text(cfg.to_json() + "\n")
    trainer = Trainer(cfg, device, label_prior_table(u_tr, y_tr))
    pix = torch.as_tensor(tr.pixels)
    u_t, y_t = torch.as_tensor(u_tr, dtype=torch.float32), torch.as_tensor(y_tr, dtype=torch.float32)
    n_batches = max(1, len(tr) // cfg.batch_size)
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    metrics_path = out / METRICS
    metrics_path.write_text("")
    t_start = time.perf_counter()
    from tqdm import tqdm

    for epoch in range(1, cfg.epochs + 1):
        trainer.train_mode()
        order = rng.permutation(len(tr))
        sums: dict[str, float] = {}
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if progress else True, file=sys.stderr)
        for b in bar:
            idx = torch.as_tensor(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = to_input(pix[idx], cfg.input, device)
            flip = torch.rand(len(x), device=device) < 0.5  # horizontal flips: faces are symmetric
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            terms = trainer.step(x, u_t[idx].to(device), y_t[idx].to(device))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
        row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v / n_batches for k, v in sums.items()}}
        row.update(trainer.evaluate(va.pixels, u_va, y_va))
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(row), flush=True)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    if method.leace:
        fit_eraser(trainer.extractor, tr.pixels, u_tr, cfg.input, device)
    state = {name: mod.state_dict() for name, mod in trainer.modules().items()}
    torch.save(state, out / CHECKPOINT)
    wall = time.perf_counter() - t_start
    final = {**asdict(cfg), "erase_rank": trainer.extractor.eraser.rank, "train_wall_s": round(wall, 1),
             "device_used": str(device)}
    (out / CONFIG).write_text(json.dumps(final, indent=2, sort_keys=True) + "\n")
    print(f"trained {cfg.epochs} epoch(s) in {wall:.1f} s on {device}; run saved to {out}", flush=True)
    if cfg.audit:
        from training.check import check_run

        check_run(out, data=data)
    return out


def fit_eraser(extractor: Extractor, pixels: np.ndarray, u: np.ndarray, spec: InputSpec,
               device: torch.device | str = "cpu") -> None:
    """Fit the extractor's LEACE layer on the features of `pixels` (train split only)."""
    feats = torch.as_tensor(extract_features(extractor, pixels, spec, device))
    extractor.eraser.fit(feats, torch.as_tensor(u))
    extractor.eraser.to(next(extractor.parameters()).device)


# --- CLI -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pric-train features", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog=f"Defaults: the recipe {recipes.describe()} (training/recipes.py); each flag "
                                       "changes one setting.", allow_abbrev=False)
    p.add_argument("--mode", choices=("pric", "features"), default="pric", help=argparse.SUPPRESS)
    add_options(p, TrainConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = from_namespace(TrainConfig, args)
    if not cfg.data:
        cfg = replace(cfg, data=str(default_data_dir()))
    method = parse_method(cfg.method)
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise InvalidInputError("--epochs must be >= 1 and --batch-size >= 2")
    if not 16 <= cfg.size <= 1024:
        raise InvalidInputError(f"--size {cfg.size}: expected 16 to 1024 pixels")
    if cfg.min_class_photos < 1:
        raise InvalidInputError("--min-class-photos must be >= 1")
    # the framing is a stated input of the model: the card records it (input.crop_box)
    crop = parse_crop_box(cfg.crop_box) if cfg.crop_box else default_crop_box(cfg.data)
    cfg = replace(cfg, input=replace(cfg.input, height=cfg.size, width=cfg.size, crop_box=crop),
                  recipe=recipes.label(asdict(cfg)))
    if method.decision and not cfg.primary:
        raise InvalidInputError("--method ...+decision releases the primary tasks' decisions: name them with --primary")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """`pric-train features ...` (training.cli dispatches here)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not cfg.private:
            raise InvalidInputError("--private: name at least one attribute")
        print(f"recipe: {recipes.describe()}: the shipped model's, the default" if cfg.recipe == recipes.DEFAULT_RECIPE
              else f"recipe: {cfg.recipe} (the default: {recipes.describe()})", flush=True)
        print(f"input: {cfg.input.width}x{cfg.input.height}, crop box {','.join(f'{v:.4g}' for v in cfg.input.crop_box)}"
              + ("" if cfg.crop_box else " (the layout's default; --crop-box to change)"), flush=True)
        train(cfg, progress=not args.no_progress)
    except ValueError as exc:
        print(f"pric-train: {exc}", file=sys.stderr)
        return 2
    except PricError as exc:
        print(f"pric-train: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
