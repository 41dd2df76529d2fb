"""Fixtures of the client tests: an in-process CLI runner, a registered participant home,
a tiny `sparse_code` model (encoder + decoder) built with onnx.helper, and the trust chain:
a throw-away auditor key (never the release key) that signs the served test models and is
in the test home's trust store; the live collector serves those attestations."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

# k_fake = 2k: the client's own floor under ambiguation (client.verify.MIN_K_FAKE = 16)
TINY_SPARSE = {"L": 4, "m": 64, "k": 8, "k_fake": 16}

# figures that pass the default policy (client.verify.Policy)
GOOD_MEASURED: dict[str, Any] = {
    "kind": "features",
    "private": {"attribute": "Male", "strongest_accuracy": 0.62, "ci95": [0.60, 0.64], "majority_rate": 0.58,
                "label_floor": 0.60, "strongest": "cnn", "n_test": 1989},
    "primary": {"Smiling": {"accuracy": 0.88}},
    "reconstruction": {"psnr": 13.5, "ssim": 0.21},
    "reid": {"rank1": 0.01, "chance_rank1": 0.001},
    "per_person": {"photos": [1, 4, 16, 64], "accuracy": [0.62, 0.66, 0.72, 0.80]},
}


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


@dataclass
class Auditor:
    """A throw-away auditor key pair for tests."""

    private: Any
    public: Any  # protocol.attestation.PublicKey
    public_file: Path

    def sign(self, model_dir: Path, measured: dict[str, Any] | None = None, card: Any = None,
             save: bool = True, data: dict[str, Any] | None = None, **statement: Any) -> dict[str, Any]:
        """Sign the model in `model_dir` (its card unless `card`), store the envelope there."""
        from protocol.attestation import build_statement, save_envelope, sign
        from protocol.model_card import load_card

        card = card or load_card(model_dir, verify=False)
        m = dict(measured or GOOD_MEASURED)
        m["kind"] = card.kind
        st = build_statement(card, model_dir, measured=m, thresholds={"max_psnr": 20.0},
                             data={"name": "celeba-10k", "split": "test", "n_test": 1989, **(data or {})},
                             auditor=self.public,
                             date="2025-01-02")
        st.update(statement)
        env = sign(st, self.private)
        if save:
            save_envelope(model_dir, env)
        return env

    def trust(self, home: str | Path) -> None:
        from client.auditors import TrustStore
        from client.home import Home

        TrustStore(Home(home)).add(self.public_file)


def make_auditor(folder: Path, name: str = "Test Auditor") -> Auditor:
    from protocol.attestation import generate_key, load_private_key

    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.pem")))
    pub = generate_key(folder / f"k{n}.pem", folder / f"k{n}.pub.json", name)
    return Auditor(load_private_key(folder / f"k{n}.pem"), pub, folder / f"k{n}.pub.json")


@pytest.fixture(scope="session")
def auditor(tmp_path_factory: pytest.TempPathFactory) -> Auditor:
    return make_auditor(tmp_path_factory.mktemp("auditor"))


@pytest.fixture(autouse=True)
def _default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A command without --home never touches the real per-user folder."""
    monkeypatch.setenv("PRIC_CLIENT_HOME", str(tmp_path / "default-home"))


@pytest.fixture(autouse=True)
def _no_release_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never rely on the shipped release key: the default store is empty."""
    monkeypatch.setattr("client.auditors.DEFAULT_KEY_FILES", ())


def sign_all(models_dir: Path, auditor: Auditor) -> None:
    for card in sorted(models_dir.glob("*/model_card.json")):
        auditor.sign(card.parent)


def signed_models(models_dir: Path, auditor: Auditor, name: str, write: Callable[[Path], Any]) -> Path:
    """An exported_models-like folder served by a test collector: `write` makes the model at
    models_dir/name, every model in the folder is signed by the test auditor."""
    write(models_dir / name)
    sign_all(models_dir, auditor)
    return models_dir


@pytest.fixture
def home(tmp_path: Path, auditor: Auditor) -> Path:
    """The participant's home; it trusts the test auditor."""
    home = tmp_path / "client-home"
    auditor.trust(home)
    return home


@pytest.fixture
def tiny_model_dir(tiny_model_dir: Path, auditor: Auditor) -> Path:
    """The tiny features model (tests/conftest.py), signed by the test auditor."""
    sign_all(tiny_model_dir, auditor)
    return tiny_model_dir


@pytest.fixture
def live_collector(live_collector):
    """The shared live collector (serving the signed test models). Until the collector has
    the attestations route (protocol.routes.MODEL_ATTESTATIONS), a shim in front of its app
    serves <model dir>/attestations/ for it; with the route, the collector answers."""
    serve_attestations(live_collector.app, live_collector.models_dir)
    return live_collector


def collector_has_attestations_route(app: Any) -> bool:
    from protocol import routes

    return any(r.rule == routes.MODEL_ATTESTATIONS for r in app.url_map.iter_rules())


def serve_attestations(app: Any, models_dir: Path) -> None:
    """WSGI shim: GET MODEL_ATTESTATIONS from the model folders, when the app lacks it."""
    if collector_has_attestations_route(app):
        return
    from protocol import routes
    from protocol.attestation import load_envelopes
    from protocol.model_card import load_card

    pattern = re.compile(re.escape(routes.MODEL_ATTESTATIONS).replace(re.escape("<model_id>"), "([^/]+)") + "$")
    inner = app.wsgi_app

    def wsgi(environ: dict, start_response: Any):
        got = pattern.match(environ.get("PATH_INFO", ""))
        if not got or environ.get("REQUEST_METHOD") != "GET":
            return inner(environ, start_response)
        for card_file in sorted(models_dir.glob("*/model_card.json")):
            card = load_card(card_file.parent, verify=False)
            if card.model_id == got.group(1):
                body = json.dumps({"model_id": card.model_id,
                                   "attestations": load_envelopes(card_file.parent)}).encode()
                start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
        body = b'{"error": "not_found", "message": "no such model"}'
        start_response("404 NOT FOUND", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    app.wsgi_app = wsgi


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
def sparse_models_dir(tmp_path: Path, auditor: Auditor) -> Path:
    """exported_models-like folder holding the tiny sparse model at <dir>/tinysparse."""
    return signed_models(tmp_path / "sparse-models", auditor, "tinysparse", write_tiny_sparse_model)


@pytest.fixture
def features_model_dir(tiny_model_dir: Path) -> Path:
    """The tiny features model folder (tests/conftest.py)."""
    return tiny_model_dir / "tiny"
