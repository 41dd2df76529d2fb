"""Fixtures of the client tests: an in-process CLI runner, a registered participant home,
and a tiny `sparse_code` model (encoder + decoder) built with onnx.helper."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TINY_SPARSE = {"L": 4, "m": 64, "k": 8, "k_fake": 8}


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(*argv: str) -> CliResult:
    from client.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err)
    return CliResult(rc, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep retry waits short in tests (the policy itself is unchanged)."""
    monkeypatch.setenv("PRIC_CLIENT_RETRIES", "2")
    monkeypatch.setenv("PRIC_CLIENT_BACKOFF", "0.05")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "client-home"


@pytest.fixture
def registered_home(live_collector, home: Path) -> Path:
    res = run_cli("--home", str(home), "register", "--server", live_collector.url)
    assert res.rc == 0, res.err
    return home


def write_tiny_sparse_model(model_dir: Path, name: str = "tinysparse", version: str = "1", seed: int = 0):
    """Encoder: Conv(3→L, 8x8, stride 8) on (N, 3, 64, 64) → (N, L, 8, 8) → reshape
    (N, L, m=64) → times a fixed 0/1 mask with k ones per map, so the output is already
    top-k sparse. Decoder `decoder.onnx`: code (N, L, m) → reshape (N, L, 8, 8) →
    ConvTranspose(L→3, 8x8, stride 8) → sigmoid → image (N, 3, 64, 64)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from protocol.model_card import ModelCard, OutputSpec, SparseSpec, sha256_file

    L, m, k = TINY_SPARSE["L"], TINY_SPARSE["m"], TINY_SPARSE["k"]
    rng = np.random.default_rng(seed)
    mask = np.zeros((L, m), np.float32)
    for row in range(L):
        mask[row, rng.choice(m, size=k, replace=False)] = 1.0
    enc = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["c"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Reshape", ["c", "shape"], ["flat"]),
            helper.make_node("Mul", ["flat", "mask"], ["code"]),
        ],
        "tiny_sparse_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("code", TensorProto.FLOAT, ["N", L, m])],
        initializer=[
            numpy_helper.from_array((rng.standard_normal((L, 3, 8, 8)) * 0.1).astype(np.float32), "w"),
            numpy_helper.from_array((rng.standard_normal(L) * 0.1 + 0.5).astype(np.float32), "b"),
            numpy_helper.from_array(np.array([0, L, m], np.int64), "shape"),
            numpy_helper.from_array(mask, "mask"),
        ],
    )
    dec = helper.make_graph(
        [
            helper.make_node("Reshape", ["code", "shape"], ["maps"]),
            helper.make_node("ConvTranspose", ["maps", "w"], ["y"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Sigmoid", ["y"], ["image"]),
        ],
        "tiny_sparse_decoder",
        [helper.make_tensor_value_info("code", TensorProto.FLOAT, ["N", L, m])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        initializer=[
            numpy_helper.from_array(np.array([0, L, 8, 8], np.int64), "shape"),
            numpy_helper.from_array((rng.standard_normal((L, 3, 8, 8)) * 0.5).astype(np.float32), "w"),
        ],
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    for graph, fname in ((enc, "model.onnx"), (dec, "decoder.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, model_dir / fname)
    card = ModelCard(
        name=name, version=version, sha256=sha256_file(model_dir / "model.onnx"), kind="sparse_code",
        output=OutputSpec(name="code", shape=(L, m), dtype="float32"),
        sparse=SparseSpec(**TINY_SPARSE),
        extra_files={"decoder.onnx": sha256_file(model_dir / "decoder.onnx")},
        training={"note": "random test model"},
    )
    card.save(model_dir)
    return card


@pytest.fixture
def sparse_models_dir(tmp_path: Path) -> Path:
    """exported_models-like folder holding the tiny sparse model at <dir>/tinysparse."""
    models = tmp_path / "sparse-models"
    write_tiny_sparse_model(models / "tinysparse")
    return models


@pytest.fixture
def features_model_dir(tiny_model_dir: Path) -> Path:
    """The tiny features model folder (tests/conftest.py)."""
    return tiny_model_dir / "tiny"
