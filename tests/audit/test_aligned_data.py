"""The audit reads photos as the card says: with an alignment section, aligned by
protocol.align exactly as the client and the training loader do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from audit.config import AuditConfig
from audit.releases import load_data
from protocol.align import Aligner, attach, default_alignment
from protocol.datasets import load_faces
from tests.conftest import write_tiny_features_model

DETECTOR = Path(__file__).resolve().parents[2] / "exported_models" / "face-detector"


def test_audit_data_of_an_aligned_card_is_aligned(tmp_path: Path, sample_faces: Path):
    spec = default_alignment(DETECTOR)
    card = attach(write_tiny_features_model(tmp_path / "m"), spec, DETECTOR, tmp_path / "m")
    cfg = AuditConfig(out="x", private="Male", primary=("Smiling",), limit=4, cache_dir=str(tmp_path / "c"),
                      progress=False)
    got = load_data(str(sample_faces), card.input, cfg, card, tmp_path / "m")
    want = load_faces(sample_faces, card.input, limit=4, cache_dir=tmp_path / "c2", progress=False, announce=False,
                      aligner=Aligner(spec, DETECTOR))
    plain = load_data(str(sample_faces), card.input, cfg)
    assert np.array_equal(got.pixels, want.pixels) and not np.array_equal(got.pixels, plain.pixels)
