"""What an audit attacks: a released model's outputs on the photos, the images the
attackers and decoders see, and the identity-disjoint train / validation / test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.attacks import check_trainable
from audit.config import AuditConfig
from protocol.datasets import TEST, TRAIN, VAL, FaceData, load_faces
from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import InputSpec, ModelCard
from protocol.preprocess import normalize
from protocol.runtime import OnnxModel, model_input


class OnnxRelease:
    """The released ONNX model, run as the device runs it (protocol.runtime):
    uint8 pixels (N, H, W, 3) → float32 (N, *card.output.shape)."""

    def __init__(self, model_dir: Path, card: ModelCard, batch_size: int = 256) -> None:
        self.model = OnnxModel(model_dir / card.file, card.input.name, card.output.name)
        self.card, self.batch_size = card, batch_size
        inp = next(i for i in self.model.session.get_inputs() if i.name == self.model.input_name)
        want = (card.input.height, card.input.width, 3) if card.input.dtype == "uint8" else \
            (3, card.input.height, card.input.width)
        got = tuple(inp.shape[1:])
        if len(got) != 3 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise ModelIntegrityError(
                f"{model_dir}: the model expects input {got} but its card states {want}")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[1:3] != (self.card.input.height, self.card.input.width):
            raise InvalidInputError(
                f"photos are {pixels.shape[1]}x{pixels.shape[2]} but the model card states "
                f"{self.card.input.height}x{self.card.input.width}")
        out = [np.asarray(self.model(model_input(pixels[i:i + self.batch_size], self.card.input)), np.float32)
               for i in range(0, len(pixels), self.batch_size)]
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


def load_data(path: str, spec: InputSpec, cfg: AuditConfig, card: ModelCard | None = None,
              model_dir: Path | None = None) -> FaceData:
    """The audit's photos, prepared as the card says: with an alignment section, each photo's
    face aligned by protocol.align with the detector files beside the model (as the client does)."""
    from protocol.align import card_aligner

    aligner = card_aligner(card, model_dir) if card is not None and model_dir is not None else None
    data = load_faces(path, spec=spec, split_file=cfg.split_file, cache_dir=cfg.cache_dir, limit=cfg.limit,
                      progress=cfg.progress, aligner=aligner)
    for name in (cfg.private, *cfg.primary):
        data.attr_index(name)
    return data


def check_classes(data: FaceData, sp: Splits, cfg: AuditConfig) -> None:
    for name in (cfg.private, *cfg.primary):
        check_trainable(data.attr(name)[sp.tr], f"attribute {name!r}", cfg.min_class_samples)


def quick_subset(data: FaceData, sizes: dict[int, int], seed: int = 0) -> FaceData:
    """The photos of a --quick run: per split at most `sizes[split]` photos, drawn as whole
    persons (seeded), so the splits stay identity-disjoint and linkage still sees persons
    with several photos; photos without an identity count as persons of one photo."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for split, cap in sizes.items():
        idx = np.flatnonzero(data.splits == split)
        if len(idx) <= cap:
            keep.append(idx)
            continue
        ident = data.identities[idx]
        person = np.where(ident >= 0, ident, -1 - np.arange(len(idx)))  # unknown: one photo each
        order = rng.permutation(np.unique(person))
        counts = dict(zip(*np.unique(person, return_counts=True)))
        chosen, n = [], 0
        for p in order:
            if n + counts[p] > cap:
                continue  # a person too large for the room left: try smaller ones
            chosen.append(p)
            n += counts[p]
            if n == cap:
                break
        keep.append(idx[np.isin(person, chosen)])
    return data.select(np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64))
