"""Export a sparse training run: the on-device encoder (with its top-k) and the authorised
users' decoder to ONNX, with a `sparse_code` model card.

    out/model.onnx    "image" (B, 3, H, W) normalised per the card → "code" (B, L, m) float32,
                      exactly k non-zeros per map
    out/decoder.onnx  "code" (B, L, m) float32 → "image" (B, 3, H, W) in [0, 1]
    out/model_card.json

The card's ambiguation (`sparse.k_fake`, fakes added per map by the client) defaults to the
run's; `k_fake=` / `--k-fake N` sets it at export time (the ONNX files do not depend on it)
and the card's `training.k_fake_trained` keeps the run's value. `--value-bits B` sets
`sparse.value_bits`: the client then quantises the true values to B bits before ambiguation.
`--decoy-codes` fits `protocol.sparse_code.CodeDecoys` on the training split's dense codes
(the encoder below its top-k) and ships them as `decoys.npz`: the client's fakes are then
whole decoy codes, every released magnitude is public and the true ones travel in the key
(card `sparse.decoys`, `magnitudes: "key"`, `wire: "compact"`).

Both graphs pass onnx.checker and are compared with torch (max abs difference ≤ 1e-4 on
real images); a mismatch fails the export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protocol.align import attach_training_alignment
from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import InputSpec, ModelCard, OutputSpec, SparseSpec, sha256_file
from protocol.model_card import VALUE_BITS_RANGE
from protocol.sparse_code import CodeDecoys
from protocol.datasets import load_faces
from training.data import to_input
from training.device_graph import make_device_file
from training.export import OPSET, export_onnx, onnx_outputs
from training.sparse.train import load_run

TOLERANCE = 1e-4
DECODER_FILE = "decoder.onnx"


def check_parity(encoder: nn.Module, decoder: nn.Module, enc_path: Path, dec_path: Path,
                 images: torch.Tensor) -> dict[str, float]:
    """Max abs differences onnxruntime vs torch: encoder codes and decoder images on `images`
    (B, 3, H, W) normalised. Top-k ties could pick different positions, so codes are
    compared only where both backends chose the same support; decoders get torch's code."""
    with torch.no_grad():
        code_t = encoder(images)
        img_t = decoder(code_t)
    code_o = onnx_outputs(enc_path, images.numpy(), "image", "code")
    img_o = onnx_outputs(dec_path, code_t.numpy(), "code", "image")
    same_support = (code_o != 0) == (code_t.numpy() != 0)
    support_agreement = float(same_support.all(axis=-1).mean())
    code_diff = float(np.abs(code_o - code_t.numpy())[same_support].max())
    img_diff = float(np.abs(img_o - img_t.numpy()).max())
    return {"encoder_max_abs_diff": code_diff, "decoder_max_abs_diff": img_diff,
            "support_agreement": support_agreement}


def _parity_images(data_dir: str | Path, spec: InputSpec, n: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Real photos of the run's data set (or --data): uint8 (n, H, W, 3) and as the float
    encoder reads them (n, 3, H, W)."""
    data = load_faces(data_dir, spec, limit=n, progress=False, announce=False)
    return data.pixels[:n], to_input(data.pixels[:n], spec)


def code_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Codes (N, L, m) of two encoders: the max abs difference where both chose the same
    support (top-k ties may pick other positions), inf when under 99% of maps agree."""
    same = (got != 0) == (want != 0)
    if same.all(axis=-1).mean() < 0.99:
        return float("inf")
    return float(np.abs(got - want)[same].max()) if same.any() else 0.0


def _epochs_completed(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


LOSS_NAMES = {"bce": "BCE on sigmoid outputs", "mse": "MSE of sigmoid outputs"}


def _loss_note(config: dict) -> str:
    """'Loss: ...' for the card, naming the warm-start run when there was one."""
    train = config.get("train", {})
    note = f"Loss: {LOSS_NAMES.get(train.get('loss', 'bce'), train.get('loss'))}"
    if train.get("init") and (Path(train["init"]) / "model_card.json").is_file():
        card = json.loads((Path(train["init"]) / "model_card.json").read_text())
        if train.get("epochs") == 0:
            return f"The weights of release {card.get('name')}@{card.get('version')}, not trained further."
        return note + f", warm-started from release {card.get('name')}@{card.get('version')}."
    if train.get("init"):
        init_cfg = Path(train["init"]) / "config.json"
        first = json.loads(init_cfg.read_text()).get("train", {}).get("loss", "bce") if init_cfg.is_file() else "?"
        note += f", warm-started from run {Path(train['init']).name} (loss {first})"
    return note + "."


def with_k_fake(sparse: SparseSpec, k_fake: int | None, where: Path) -> SparseSpec:
    """`sparse` with its ambiguation set to `k_fake` fakes per map (None: unchanged);
    0 <= k_fake and k + k_fake <= m, else InvalidInputError naming `where`."""
    if k_fake is None:
        return sparse
    if not 0 <= k_fake <= sparse.m - sparse.k:
        raise InvalidInputError(f"{where}: --k-fake {k_fake} must be in [0, m - k = {sparse.m - sparse.k}] "
                                f"(k' = k + k_fake non-zeros per map of length m = {sparse.m})")
    return replace(sparse, k_fake=int(k_fake))


def with_value_bits(sparse: SparseSpec, value_bits: int | None, where: Path) -> SparseSpec:
    """`sparse` whose client quantises the true values to `value_bits` bits before ambiguation
    (None: unchanged, float16 values); outside `VALUE_BITS_RANGE` → InvalidInputError."""
    if value_bits is None:
        return sparse
    lo, hi = VALUE_BITS_RANGE
    if not lo <= value_bits <= hi:
        raise InvalidInputError(f"{where}: --value-bits {value_bits} must be in [{lo}, {hi}]")
    return replace(sparse, value_bits=int(value_bits))


DECOYS_FILE = "decoys.npz"
DECOY_RANK = 256  # the Gaussian's rank (sparse-celeba: 0.994 of the dense codes' variance)
MIN_DECOY_PHOTOS = 16


def fit_decoys(model: nn.Module, data_dir: str | Path, spec: InputSpec, sparse: SparseSpec, where: Path,
               align: str | None = None, batch: int = 256) -> CodeDecoys:
    """CodeDecoys of the run's encoder on the training split of `data_dir` (its dense codes,
    before the top-k; faces aligned as the run trained on them); InvalidInputError when the
    card cannot use them."""
    if sparse.value_bits is None or sparse.k_fake % sparse.k or sparse.k_fake == 0:
        raise InvalidInputError(f"{where}: --decoy-codes needs --value-bits and k_fake a positive multiple of k "
                                f"(k={sparse.k}, k_fake={sparse.k_fake})")
    from protocol.align import training_aligner

    data = load_faces(data_dir, spec, progress=False, announce=False, aligner=training_aligner(align)).subset("train")
    if len(data) < MIN_DECOY_PHOTOS:
        raise InvalidInputError(f"{data_dir}: {len(data)} training photos; decoy codes need at least {MIN_DECOY_PHOTOS}")
    with torch.no_grad():
        dense = np.concatenate([model.encoder(to_input(data.pixels[i:i + batch], spec)).numpy()
                                for i in range(0, len(data), batch)])
    return CodeDecoys.fit(dense, sparse.k, rank=min(DECOY_RANK, len(data) - 1))


def export_run(run_dir: Path, out_dir: Path, name: str | None = None, version: str | None = None,
               k_fake: int | None = None, value_bits: int | None = None, data: str | None = None,
               decoy_codes: bool = False) -> Path:
    """Export RUN_DIR to OUT_DIR (model.onnx, decoder.onnx, model_card.json); returns OUT_DIR.
    `k_fake` overrides the run's fakes per map in the card (None: the run's); `value_bits`
    sets the card's `sparse.value_bits` (None: float16 values, as before). The parity check
    runs on photos of `data` (None: the data set the run was trained on)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, config = load_run(run_dir)
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["input"].items()})
    trained = SparseSpec(**config["sparse"])
    sparse = with_value_bits(with_k_fake(trained, k_fake, run_dir), value_bits, run_dir)
    model.eval()
    decoys = (fit_decoys(model, data or config["train"]["data"], spec, sparse, run_dir, config["train"].get("align"))
              if decoy_codes else None)
    encoder, decoder = model.on_device_encoder().eval(), model.image_decoder().eval()

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pixels, images = _parity_images(data or config["train"]["data"], spec)
    with torch.no_grad():
        example_code = encoder(images[:2])
    export_onnx(encoder, images[:2], tmp / "model.onnx", "image", "code")
    export_onnx(decoder, example_code, tmp / DECODER_FILE, "code", "image")
    parity = check_parity(encoder, decoder, tmp / "model.onnx", tmp / DECODER_FILE, images)
    if parity["encoder_max_abs_diff"] > TOLERANCE or parity["decoder_max_abs_diff"] > TOLERANCE \
            or parity["support_agreement"] < 0.99:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelIntegrityError(f"{run_dir}: ONNX and torch disagree ({json.dumps(parity)})")
    # the file a device runs: uint8 pixels in, the normalisation inside the encoder's graph
    spec, parity["device_graph_max_abs_diff"] = make_device_file(tmp / "model.onnx", spec, pixels, "code",
                                                                 code_difference)

    extra_files = {DECODER_FILE: sha256_file(tmp / DECODER_FILE)}
    if decoys is not None:
        decoys.save(tmp / DECOYS_FILE)
        extra_files[DECOYS_FILE] = sha256_file(tmp / DECOYS_FILE)
        sparse = replace(sparse, decoys=DECOYS_FILE, magnitudes="key", wire="compact")
    card = ModelCard(
        name=name or out_dir.name,
        version=version or "1",
        sha256=sha256_file(tmp / "model.onnx"),
        kind="sparse_code",
        input=spec,
        output=OutputSpec(name="code", shape=(sparse.L, sparse.m), dtype="float32"),
        sparse=sparse,
        extra_files=extra_files,
        training={
            "mode": "sparse",
            "run": run_dir.name,
            "model": config["model"],
            "best_epoch": config.get("best_epoch"),
            "best_val_psnr": config.get("best_val_psnr"),
            "epochs": config["train"]["epochs"],
            "epochs_completed": _epochs_completed(run_dir),
            **({"note": config["note"]} if config.get("note") else {}),
            "k_fake_trained": trained.k_fake,
            "parity": parity,
        },
        description="Sparse-code encoder (top-k per code map) for ambiguated release; decoder.onnx is for "
                    f"key holders. {_loss_note(config)}",
    ).validate()
    card = attach_training_alignment(card, config["train"].get("align"), tmp)
    card.save(tmp)
    (tmp / "export_config.json").write_text(json.dumps({"run_dir": str(run_dir), "name": card.name,
                                                        "version": card.version, "opset": OPSET}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
