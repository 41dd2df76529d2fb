"""pric-detector-export: MTCNN weights from the facenet-pytorch wheel -> ONNX + detector card.

    pip download facenet-pytorch==2.6.0 --no-deps -d wheels/
    python -m training.detector.export --wheel wheels/facenet_pytorch-2.6.0-py3-none-any.whl \
        --out exported_models/face-detector

The wheel is only read as a zip (never installed or imported; its dependencies would pull
another torch). Each network is exported with the project's exporter conventions (dynamo
exporter, opset 18, onnx.checker) and compared with torch (max abs diff <= PARITY_TOL) on
random pixels and on the sample faces; the card (protocol.faces.DetectorCard) states each
file's sha256, the thresholds and pyramid factor, and the wheel's own sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from protocol.errors import ModelIntegrityError, PricError
from protocol.faces import DETECTOR_FILES, DetectorCard, DetectorSpec
from protocol.model_card import sha256_file
from protocol.runtime import OnnxModel
from training.detector.nets import WHEEL_PACKAGE, WHEEL_VERSION, load_nets
from training.export import OPSET

PARITY_TOL = 1e-4
# P-Net runs on every level of the image pyramid: height and width are dynamic
_SIZES = {"pnet": (64, 80), "rnet": (24, 24), "onet": (48, 48)}


def export_net(name: str, net: torch.nn.Module, path: Path) -> None:
    """One network to ONNX: dynamic batch, and for P-Net dynamic height and width."""
    import onnx

    h, w = _SIZES[name]
    dims: dict[int, object] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if name == "pnet":
        dims |= {2: torch.export.Dim("height", min=12, max=8192), 3: torch.export.Dim("width", min=12, max=8192)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net.eval(), (torch.rand(2, 3, h, w) * 255,), dynamo=True,
                                        input_names=["pixels"], output_names=["out"], dynamic_shapes=(dims,),
                                        opset_version=OPSET, external_data=False, verbose=False)
        program.save(str(path))
        # the exporter's per-node metadata holds stack traces with this machine's source
        # paths and line numbers: dropped, so the file's bytes (and sha256) depend only on
        # the weights and the graph, and anyone can re-make them from the same wheel
        model = onnx.load(str(path))
        for node in model.graph.node:
            del node.metadata_props[:]
        onnx.save(model, str(path))
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:  # the exporter raises many kinds; name it in one line
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelIntegrityError(f"{path}: ONNX export failed ({type(exc).__name__}: {msg})") from None


def parity_inputs(name: str, faces: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Float32 (N, 3, H, W) pixel batches: random ones, and the sample faces resized to the
    network's input (P-Net: whole faces at two sizes, odd sizes included)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = _SIZES[name]
    out = [rng.uniform(0, 255, (3, 3, h, w)).astype(np.float32)]
    sizes = [(h, w)] if name != "pnet" else [(109, 89), (57, 45), (13, 17)]
    for sh, sw in sizes:
        batch = [np.asarray(Image.fromarray(f).resize((sw, sh), Image.Resampling.BOX), np.float32) for f in faces]
        if batch:
            out.append(np.stack(batch).transpose(0, 3, 1, 2).copy())
    return out


def export_detector(wheel: Path, out: Path, faces: Sequence[np.ndarray], version: str = "1") -> DetectorCard:
    nets = load_nets(wheel)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in zip(("pnet", "rnet", "onet"), DETECTOR_FILES):
            path = Path(tmp) / file
            export_net(name, nets[name], path)
            model = OnnxModel(path)
            worst = 0.0
            for x in parity_inputs(name, faces):
                with torch.no_grad():
                    want = nets[name](torch.from_numpy(x)).numpy()
                got = model(x)
                if got.shape != want.shape:
                    raise ModelIntegrityError(f"{path}: ONNX output shape {got.shape} != torch {want.shape}")
                worst = max(worst, float(np.abs(got - want).max()))
            if worst > PARITY_TOL:
                raise ModelIntegrityError(f"{path}: ONNX differs from torch by {worst:.2e} > {PARITY_TOL}")
            diffs[file] = worst
            (out / file).write_bytes(path.read_bytes())
            files[file] = sha256_file(out / file)
    card = DetectorCard(
        spec=DetectorSpec(name="face-detector", version=version, files=files),
        source={"package": WHEEL_PACKAGE, "version": WHEEL_VERSION, "wheel": Path(wheel).name,
                "wheel_sha256": sha256_file(wheel), "opset": OPSET, "parity_max_abs_diff": diffs},
        description=("MTCNN (Zhang et al. 2016) face detector with 5 landmarks: P-Net on an image pyramid, "
                     "R-Net and O-Net on the candidates. Weights: the state dicts shipped inside the "
                     f"{WHEEL_PACKAGE} {WHEEL_VERSION} wheel, loaded with weights_only=True into "
                     "training/detector/nets.py and exported to ONNX. Input: float32 RGB pixels in "
                     "[0, 255], (N, 3, H, W); normalisation inside the graph."),
    ).validate()
    card.save(out)
    return card


def sample_faces(folder: Path, limit: int = 8) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pric-detector-export", description=__doc__.splitlines()[0])
    p.add_argument("--wheel", required=True, help=f"the {WHEEL_PACKAGE}=={WHEEL_VERSION} wheel (pip download --no-deps)")
    p.add_argument("--out", default="exported_models/face-detector")
    p.add_argument("--faces", default="scripts/sample_faces", help="photos for the parity check")
    p.add_argument("--version", default="1")
    args = p.parse_args(argv)
    try:
        card = export_detector(Path(args.wheel), Path(args.out), sample_faces(Path(args.faces)), args.version)
    except PricError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"detector": card.spec.model_id, "files": card.spec.files,
                      "parity": card.source["parity_max_abs_diff"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
