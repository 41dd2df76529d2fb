"""Without --current-model the collector hands out the anonymized-features model, even when
a sparse-code model with a higher version or a later name is served beside it."""

from __future__ import annotations

import json

from collector.app import create_app
from protocol.model_card import CARD_FILE


def test_default_current_prefers_features(tmp_path, tiny_model_dir, auditor):
    sparse_dir = tiny_model_dir / "zz-sparse"
    sparse_dir.mkdir()
    card = json.loads((tiny_model_dir / "tiny" / CARD_FILE).read_text())
    (sparse_dir / "model.onnx").write_bytes((tiny_model_dir / "tiny" / "model.onnx").read_bytes())
    card.update(name="zz-sparse", version="9", kind="sparse_code",
                sparse={"L": 16, "m": 64, "k": 4, "k_fake": 4}, output={"name": "code", "shape": [16, 64], "dtype": "float32"})
    card.pop("model_id", None)
    (sparse_dir / CARD_FILE).write_text(json.dumps(card))
    auditor.sign(sparse_dir)
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(tiny_model_dir), "TESTING": True})
    registry = app.extensions["pric"].registry
    assert "zz-sparse@9" in registry.active_ids()
    assert registry.current().model_id == "tiny@1"
