"""Warm-start a sparse autoencoder from an exported release (`pric-train sparse --init
exported_models/NAME`), for fine-tuning a shipped model whose training run is not at hand.

The release's ONNX files hold every weight the training model has, except that the
exporter folded each BatchNorm into the convolution before it (weight W' = W·γ/σ and a bias
b' named `<conv>.weight_bias`). The convolution takes W', and its BatchNorm is rebuilt so that
it reproduces the folded function exactly in eval mode *and* approximately in training mode:
running mean/variance = the statistics of the convolution's output on the given photos,
γ = the running standard deviation, β = the running mean + b'. The rebuilt model's codes
and decoded images are then checked against the release's own files (onnxruntime) on those
photos; a difference over the tolerance is a ModelIntegrityError naming the release.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import ModelCard, load_card

TOLERANCE = 1e-3  # float32 differences of the folded vs unfolded BatchNorm, over three layers
FUSED_BIAS = "{}.weight_bias"


def is_release(path: Path) -> bool:
    return (Path(path) / "model_card.json").is_file()


def onnx_weights(*paths: Path) -> dict[str, np.ndarray]:
    """Every named initializer of the ONNX files (float arrays), by name."""
    import onnx
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for path in paths:
        for init in onnx.load(str(path), load_external_data=False).graph.initializer:
            out[init.name] = numpy_helper.to_array(init)
    return out


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm2d right after a convolution in a
    Sequential of `model`."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())
        for (a, conv), (b, bn) in itertools.pairwise(kids):
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def _tensor(weights: dict[str, np.ndarray], name: str, like: torch.Tensor, where: Path) -> torch.Tensor:
    if name not in weights:
        raise InvalidInputError(f"--init {where}: its ONNX files have no weight {name!r} (another architecture?)")
    t = torch.from_numpy(np.array(weights[name], dtype=np.float32))
    if tuple(t.shape) != tuple(like.shape):
        raise InvalidInputError(f"--init {where}: weight {name!r} is {tuple(t.shape)}, this run's model needs "
                                f"{tuple(like.shape)} (other model settings?)")
    return t


@torch.no_grad()
def load_release(model: nn.Module, release: Path, pixels: np.ndarray) -> None:
    """Set `model` (a SparseAutoencoder) to the weights of the exported release folder, its
    BatchNorms rebuilt from the statistics on `pixels` (B, H, W, 3) uint8 photos prepared as
    the release's card says."""
    from training.data import to_input
    from training.sparse.export import DECODER_FILE

    release = Path(release)
    card = load_card(release)
    if card.kind != "sparse_code":
        raise InvalidInputError(f"--init {release}: {card.model_id} is a {card.kind} model, not a sparse code")
    images = to_input(pixels, card.input)
    weights = onnx_weights(release / card.file, release / DECODER_FILE)
    state = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        new[f"{conv}.weight"] = _tensor(weights, f"{conv}.weight", state[f"{conv}.weight"], release)
        bias = _tensor(weights, FUSED_BIAS.format(conv), state[f"{bn}.bias"], release)
        # identity BatchNorm plus the folded bias: eval output = folded function, exactly
        new[f"{bn}.weight"] = torch.ones_like(bias)
        new[f"{bn}.bias"] = bias
        new[f"{bn}.running_mean"] = torch.zeros_like(bias)
        new[f"{bn}.running_var"] = torch.full_like(bias, 1.0) - model.get_submodule(bn).eps
        new[f"{bn}.num_batches_tracked"] = state[f"{bn}.num_batches_tracked"]
    for key, value in state.items():
        if key not in new:
            new[key] = _tensor(weights, key, value, release)
    model.load_state_dict(new)
    model.eval()

    # the convolutions' output statistics on real photos → BatchNorms that also hold in training
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.get_submodule(bn).register_forward_hook(
        lambda mod, inp, out, bn=bn: stats.__setitem__(bn, (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3)))))
        for _, bn in pairs]
    model(images)
    for h in hooks:
        h.remove()
    for _, bn in pairs:
        mod = model.get_submodule(bn)
        mean, var = stats[bn]
        mod.running_mean.copy_(mean)
        mod.running_var.copy_(var)
        mod.bias.copy_(mod.bias + mean)
        mod.weight.copy_(torch.sqrt(var + mod.eps))
    check(model, release, card, pixels)


def check(model: nn.Module, release: Path, card: ModelCard, pixels: np.ndarray) -> None:
    """The rebuilt model against the release's files on `pixels`: same codes (on the common
    support) and the same decoded images, else ModelIntegrityError."""
    from protocol.runtime import OnnxModel
    from training.data import to_input
    from training.sparse.export import DECODER_FILE, code_difference

    model.eval()
    with torch.no_grad():
        code = model.on_device_encoder()(to_input(pixels, card.input))
        img = model.image_decoder()(code)
    # a device graph (uint8 input) takes the pixels as they are, a float graph normalised ones
    x = pixels if card.input.dtype == "uint8" else to_input(pixels, card.input).numpy()
    code_o = np.asarray(OnnxModel(release / card.file, card.input.name, "code")(x), np.float32)
    img_o = np.asarray(OnnxModel(release / DECODER_FILE, "code", "image")(code.numpy()), np.float32)
    diffs = {"code": code_difference(code_o, code.numpy()), "image": float(np.abs(img_o - img.numpy()).max())}
    if not max(diffs.values()) <= TOLERANCE:
        raise ModelIntegrityError(f"--init {release}: the rebuilt model differs from the release's files "
                                  f"(max abs difference code {diffs['code']:.2e}, image {diffs['image']:.2e})")
