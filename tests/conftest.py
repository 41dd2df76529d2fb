"""Shared fixtures. Real-data tests skip with a reason where celeba-10k is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# 48 celeba-10k thumbnails with labels, bundled with the demo (scripts/) and used by the tests
SAMPLE_FACES = REPO / "scripts" / "sample_faces"


def celeba_path() -> Path:
    """celeba-10k: $PRIC_CELEBA, else $PRIC_DATA (what the commands read), else
    ../shared/data/celeba-10k beside the checkout."""
    env = os.environ.get("PRIC_CELEBA") or os.environ.get("PRIC_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "celeba-10k"


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    path = celeba_path()
    if not (path / "list_attr_celeba.txt").is_file():
        pytest.skip(f"celeba-10k not found at {path} (set PRIC_CELEBA to its folder)")
    return path


@pytest.fixture(scope="session")
def sample_faces() -> Path:
    """48 bundled CelebA thumbnails in the generic layout (images/ + labels.csv with split)."""
    return SAMPLE_FACES


@pytest.fixture(scope="session")
def sample_images(sample_faces: Path) -> list[Path]:
    return sorted((sample_faces / "images").glob("*.jpg"))


def write_tiny_features_model(model_dir: Path, name: str = "tiny", version: str = "1", seed: int = 0) -> "ModelCard":
    """A small valid `features` model built with onnx.helper (no torch): Conv(3→16, 8x8,
    stride 8) maps (N, 3, 64, 64) to (N, 16, 8, 8). Returns its card."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from protocol.model_card import ModelCard, OutputSpec, sha256_file

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((16, 3, 8, 8)) * 0.05).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(16, np.float32), "b")
    node = helper.make_node("Conv", ["image", "w", "b"], ["feature"], kernel_shape=[8, 8], strides=[8, 8])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["N", 16, 8, 8])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "model.onnx")
    card = ModelCard(
        name=name, version=version, sha256=sha256_file(model_dir / "model.onnx"),
        output=OutputSpec(name="feature", shape=(16, 8, 8), dtype="float32"),
        training={"note": "random test model"},
    )
    card.save(model_dir)
    return card


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """exported_models-like folder holding one tiny `features` model at <dir>/tiny."""
    models = tmp_path / "models"
    write_tiny_features_model(models / "tiny")
    return models


@pytest.fixture
def live_collector(tmp_path: Path, tiny_model_dir: Path):
    """A real collector (create_app) served on 127.0.0.1 on a free port in a thread.

    Yields a namespace: url, app, data_dir, models_dir, operator_token, auditor_token.
    """
    import threading
    from types import SimpleNamespace

    from werkzeug.serving import make_server

    from collector.app import create_app, issue_token

    data_dir = tmp_path / "collector-data"
    app = create_app({"DATA_DIR": str(data_dir), "MODELS_DIR": str(tiny_model_dir), "TESTING": True,
                      "ALLOW_UNATTESTED": True})  # the client checks attestations itself
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{server.server_port}",
            app=app,
            data_dir=data_dir,
            models_dir=tiny_model_dir,
            operator_token=issue_token(app, "operator"),
            auditor_token=issue_token(app, "auditor"),
        )
    finally:
        server.shutdown()
        thread.join(timeout=5)


# --- a tiny sparse autoencoder run and its export (training, audit and research tests) ----
SPARSE_TINY = ["--L", "2", "--m", "32", "--k", "4", "--k-train", "6", "--k-fake", "4", "--channels", "8,8,8",
               "--batch-size", "16", "--threads", "1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, sample_faces: Path) -> Path:
    run = tmp_path_factory.mktemp("sparse") / "run"
    from training.sparse import train as sparse_train

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "2", "--out", str(run),
                            "--device", "cpu", "--seed", "1", *SPARSE_TINY])
    assert rc == 0
    return run


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path) -> Path:
    from training.sparse import export as sparse_export

    return sparse_export.export_run(tiny_run, tiny_run.parent / "exported" / "sparse-tiny", None, "t1")


@pytest.fixture(scope="session")
def sparse_tiny_flags() -> list[str]:
    """The tiny sparse settings of `tiny_run`, for tests that train beside it."""
    return list(SPARSE_TINY)


@pytest.fixture
def decode_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image protocol.preprocess.load_image decodes during the test, in order."""
    import protocol.preprocess as pre

    sizes: list[tuple[int, int]] = []
    real = pre.load_image

    def spy(*args, **kwargs):
        img = real(*args, **kwargs)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(pre, "load_image", spy)
    return sizes
