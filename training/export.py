"""pric-export: a pric-train run folder -> exported_models/NAME/{model.onnx, model_card.json}.

The on-device extractor (training/models/extractor.py, the same module the parity test
uses) is exported with input `card.input.name` (dynamic batch) and output `feature`,
checked with onnx.checker, and compared with torch on real images of the run's dataset
(max abs diff <= 1e-4, otherwise the export fails). Runs with "mode": "sparse" are handed
to training.sparse.export.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from protocol.align import attach_training_alignment
from protocol.errors import InvalidInputError, ModelIntegrityError, PricError
from protocol.model_card import ModelCard, OutputSpec, sha256_file
from protocol.runtime import OnnxModel
from training.device_graph import make_device_file
from protocol.datasets import load_faces
from training import recipes
from training.train import CONFIG, METRICS, load_extractor, to_input

MODEL_FILE = "model.onnx"
FEATURE_OUTPUT = "feature"
PARITY_TOL = 1e-4
MAX_MODEL_BYTES = 5 * 2**20


@dataclass(frozen=True)
class ExportConfig:
    run_dir: str
    out: str
    name: str | None = None
    version: str | None = None
    data: str | None = None
    n_check: int = 32


OPSET = 18


def strip_build_metadata(proto: Any) -> Any:
    """Drop what the exporter records about the build (each node's source stack trace with
    the builder's file paths, module names, rewrite rules; doc strings): a shipped file
    carries the computation only. Returns the same ModelProto."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for g in graphs:
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
    proto.doc_string = ""
    proto.graph.doc_string = ""
    return proto


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_name: str) -> None:
    """Write `model` (eval mode) to ONNX with the dynamo exporter and a dynamic batch axis;
    onnx.checker validates the file. The only exporter of the project: a model it cannot
    export is an error (ModelIntegrityError), never a silent switch to another exporter."""
    import onnx

    model = model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), opset_version=OPSET,
                external_data=False, verbose=False,
            )
        program.save(str(path))
        proto = strip_build_metadata(onnx.load(str(path)))
        onnx.save(proto, str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # the exporter raises many kinds; name it in one line
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelIntegrityError(f"{path}: ONNX export failed ({type(exc).__name__}: {msg})") from None


def onnx_outputs(onnx_path: Path, x: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    """The exported file run as the device runs it (protocol.runtime), float32 out."""
    return np.asarray(OnnxModel(onnx_path, input_name, output_name)(x.astype(np.float32)), np.float32)


def parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, input_name: str) -> float:
    """Max abs difference of onnxruntime vs torch on x (B, 3, H, W) float32."""
    got = onnx_outputs(onnx_path, x, input_name, FEATURE_OUTPUT)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    if got.shape != want.shape:
        raise ModelIntegrityError(f"{onnx_path}: output shape {got.shape} differs from torch {want.shape}")
    return float(np.abs(got - want).max())


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS
    lines = [l for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def export_run(cfg: ExportConfig) -> Path:
    run_dir, out = Path(cfg.run_dir), Path(cfg.out)
    model, tcfg = load_extractor(run_dir)
    spec = tcfg.input
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / MODEL_FILE
    export_onnx(model, torch.zeros(2, 3, spec.height, spec.width), onnx_path, spec.name, FEATURE_OUTPUT)
    size = onnx_path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelIntegrityError(f"{onnx_path}: {size} bytes exceeds the 5 MB limit")
    data = load_faces(cfg.data or tcfg.data, spec, limit=cfg.n_check, progress=False, announce=False)
    x = to_input(data.pixels[: cfg.n_check], spec).numpy()
    diff = parity(model, onnx_path, x, spec.name)
    if not diff <= PARITY_TOL:
        onnx_path.unlink()
        raise ModelIntegrityError(f"{onnx_path}: onnxruntime differs from torch by {diff:.2e} > {PARITY_TOL}")
    # the file a device runs: uint8 pixels in, the card's normalisation inside the graph
    spec, device_diff = make_device_file(onnx_path, spec, data.pixels[: cfg.n_check], FEATURE_OUTPUT)
    saved = json.loads((run_dir / CONFIG).read_text())
    last = _last_metrics(run_dir)
    card = ModelCard(
        name=cfg.name or out.name,
        version=cfg.version or "1",
        sha256=sha256_file(onnx_path),
        kind="features",
        input=spec,
        output=OutputSpec(name="feature", shape=tuple(model.feature_shape), dtype="float32"),
        training={
            # the recipe (training/recipes.py) the run is, or which of its settings it changed
            "recipe": recipes.label(asdict(tcfg)),
            "dataset": Path(tcfg.data).name,
            "private": list(tcfg.private),
            "primary": list(tcfg.primary),
            "method": tcfg.method,
            "lambda": tcfg.lam,
            "adv_weight": tcfg.adv_weight,
            "penalty_weight": tcfg.penalty_weight,
            "epochs": tcfg.epochs,
            "seed": tcfg.seed,
            "arch": tcfg.arch,
            "width": tcfg.width,
            "train_wall_s": saved.get("train_wall_s"),
            "device": saved.get("device_used"),
            "erase_rank": saved.get("erase_rank", 0),
            "co_trained_val": {k: v for k, v in last.items() if k.startswith("val_")},
            "onnx_parity_max_abs_diff": diff,
            "device_graph_max_abs_diff": device_diff,
        },
        description=(
            f"PRIC feature extractor hiding {', '.join(tcfg.private)} while keeping "
            f"{', '.join(tcfg.primary)}; method {tcfg.method}, λ={tcfg.lam}. Judge privacy by the audit "
            "section (fresh attackers), not by the co-trained adversary."
        ),
    ).validate()
    card = attach_training_alignment(card, tcfg.align, out)
    card.save(out)
    (out / "export_config.json").write_text(json.dumps(cfg.__dict__, indent=2) + "\n")
    (out / "train_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    print(f"exported {card.model_id} to {onnx_path} ({size / 1e6:.2f} MB, parity {diff:.1e})", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pric-export", description="export a pric-train run to ONNX + model card")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="exported_models/NAME")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--data", help="images for the parity check (default: the run's dataset)")
    p.add_argument("--k-fake", type=int, default=None,
                   help="sparse runs only: fake non-zeros per code map in the card (default: the run's)")
    p.add_argument("--check", action="store_true",
                   help="features runs: after export, the quick fresh-attacker check of pric-train check (check.json "
                        "in the run folder)")
    p.add_argument("--value-bits", type=int, default=None,
                   help="sparse runs only: bits per released value (card sparse.value_bits; default: float16)")
    p.add_argument("--decoy-codes", action="store_true",
                   help="sparse runs only: fakes are whole decoy codes fitted on the training split, every released "
                        "magnitude public and the true ones in the owner's key, sent compact (card sparse.decoys, "
                        "magnitudes 'key', wire 'compact'; needs --value-bits and k_fake a multiple of k)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    run_dir = Path(args.run_dir)
    try:
        cfg_path = run_dir / CONFIG
        if not cfg_path.is_file():
            raise InvalidInputError(f"{run_dir}: no {CONFIG} (not a training run folder)")
        if json.loads(cfg_path.read_text()).get("mode") == "sparse":
            if args.check:
                raise InvalidInputError(f"{run_dir}: --check applies to features runs only (this run's mode is 'sparse')")
            from training.sparse import export as sparse_export

            extra = {} if args.k_fake is None else {"k_fake": args.k_fake}
            if args.value_bits is not None:
                extra["value_bits"] = args.value_bits
            if args.decoy_codes:
                extra["decoy_codes"] = True
            sparse_export.export_run(run_dir, Path(args.out), args.name, args.version, **extra,
                                     **({"data": args.data} if args.data else {}))
            return 0
        for flag, value in (("--k-fake", args.k_fake), ("--value-bits", args.value_bits),
                            ("--decoy-codes", args.decoy_codes or None)):
            if value is not None:
                raise InvalidInputError(f"{run_dir}: {flag} applies to sparse runs only (this run's mode is not 'sparse')")
        export_run(ExportConfig(run_dir=args.run_dir, out=args.out, name=args.name, version=args.version, data=args.data))
        if args.check:
            from training.check import check_run

            check_run(run_dir)
    except PricError as exc:
        print(f"pric-export: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
