"""Model fetch, cache and integrity check (the onnxruntime runner is protocol.runtime).

The current model card comes from the collector; its files are cached under
`<home>/models/<model_id>/` and their sha256 is checked against the card before every
use (protocol.model_card.verify_model_files). A cached file that does not match is
refused, never silently replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.api import CollectorAPI
from client.home import Home
from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import CARD_FILE, InputSpec, ModelCard, load_card, verify_model_files
from protocol.runtime import OnnxModel

__all__ = ["OnnxModel", "PIXELS", "fetch_model", "find_cached_model", "open_model_dir", "pixel_input_graph"]

# name of the uint8 input of a graph with the normalisation inside (pixel_input_graph)
PIXELS = "pric_pixels"


def fetch_model(api: CollectorAPI, home: Home) -> tuple[ModelCard, Path]:
    """The collector's current model, cached in home and verified. Returns (card, dir)."""
    card = api.model_card()
    model_dir = home.model_dir(card.model_id)
    cached_card = model_dir / CARD_FILE
    if cached_card.is_file():
        old = ModelCard.from_json(cached_card.read_text())
        if (old.sha256, old.extra_files) != (card.sha256, card.extra_files):
            raise ModelIntegrityError(
                f"{model_dir}: the collector's card for {card.model_id} states other file hashes than the cached one; "
                "refusing (remove that folder to accept the collector's)"
            )
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in [card.file, *card.extra_files]:
        if not (model_dir / name).exists():
            tmp = model_dir / (name + ".part")
            try:
                api.model_file(card, name, tmp)  # streamed, size-capped, sha256-checked
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(model_dir / name)
    card.save(model_dir)
    return open_model_dir(model_dir), model_dir


def open_model_dir(model_dir: str | Path) -> ModelCard:
    """Card of a local model folder, after checking every file's sha256 (refuses on mismatch)."""
    model_dir = Path(model_dir)
    card = load_card(model_dir, verify=False)
    try:
        verify_model_files(card, model_dir)
    except ModelIntegrityError as exc:
        raise ModelIntegrityError(f"{exc.message}; refusing to use model {card.model_id}") from None
    return card


def find_cached_model(home: Home, model_id: str | None = None) -> Path:
    """A cached model folder: the one named, else the only one, else the newest."""
    if model_id:
        path = home.model_dir(model_id)
        if not (path / CARD_FILE).is_file():
            raise InvalidInputError(f"{path}: model {model_id} is not cached; pass --model-dir or run upload once")
        return path
    dirs = sorted(
        (d for d in home.models_dir.glob("*") if (d / CARD_FILE).is_file()),
        key=lambda d: (d / CARD_FILE).stat().st_mtime,
    )
    if not dirs:
        raise InvalidInputError(f"{home.models_dir}: no cached model; pass --model-dir DIR or run upload once")
    return dirs[-1]


def pixel_input_graph(model_bytes: bytes, spec: InputSpec) -> bytes | None:
    """The model file's ONNX graph with protocol.preprocess.normalize moved inside it:
    input PIXELS uint8 (B, H, W, 3) → Transpose → Cast → ·1/(255·std) + (−mean/std) → the
    card's input. Saves the client a float pass over every photo in numpy (the graph does
    it on each 16-photo chunk while its activations are in cache); when the first layer is
    an unpadded Conv (pric-male@5's 4x4 stride-4 stem), the Mul and Add are folded into its
    weights instead, and without dilation the Transpose goes too (_fold_into_first_conv).
    Values equal normalize's
    to float32 rounding (a·x + b instead of (x/255 − mean)/std). None without the optional
    `onnx` package, for bytes that are not an ONNX model, or for a graph whose input is
    not float (B, 3, H, W)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # protobuf's DecodeError and kin: onnxruntime then refuses the file in one line
        return None
    graph = model.graph
    inputs = [i for i in graph.input if i.name == spec.name]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]  # 0: symbolic
    if len(dims) != 4 or any(d not in (want, 0) for d, want in zip(dims[1:], (3, spec.height, spec.width))):
        return None
    std = np.asarray(spec.std, np.float32)
    scale = (np.float32(1.0) / (np.float32(255.0) * std)).reshape(1, 3, 1, 1)
    shift = (-np.asarray(spec.mean, np.float32) / std).reshape(1, 3, 1, 1)
    graph.input.remove(inputs[0])
    graph.input.insert(0, helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["B", spec.height, spec.width, 3]))
    folded = _fold_into_first_conv(graph, spec.name, scale, shift)
    if folded == "rows":  # the Conv reads (B, 1, H, W·3): a free reshape of the pixels
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, 1, spec.height, spec.width * 3], np.int64), "pric_rows_shape"))
        nodes = [helper.make_node("Cast", [PIXELS], ["pric_hwc"], to=TensorProto.FLOAT),
                 helper.make_node("Reshape", ["pric_hwc", "pric_rows_shape"], [_ROWS])]
    else:
        nodes = [helper.make_node("Transpose", [PIXELS], ["pric_chw"], perm=[0, 3, 1, 2]),
                 helper.make_node("Cast", ["pric_chw"], ["pric_float"], to=TensorProto.FLOAT)]
        if folded is None:
            graph.initializer.extend([numpy_helper.from_array(scale, "pric_scale"),
                                      numpy_helper.from_array(shift, "pric_shift")])
            nodes += [helper.make_node("Mul", ["pric_float", "pric_scale"], ["pric_scaled"]),
                      helper.make_node("Add", ["pric_scaled", "pric_shift"], [spec.name])]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return model.SerializeToString()


_ROWS = "pric_rows"


def _fold_into_first_conv(graph, name: str, scale: np.ndarray, shift: np.ndarray) -> str | None:  # noqa: ANN001
    """When `name` feeds exactly one unpadded Conv whose weights (and bias) are initializers
    used nowhere else, fold x·scale + shift into them (exact up to float rounding: without
    padding every output sees the shift through all of its weights). Saves the client two
    passes over the pixels. Returns what the Conv then reads:

    - "rows" (no dilation): the pixels as they come, reshaped to (B, 1, H, W·3). A kh×kw
      Conv over 3 channels with strides (sh, sw) is a kh×3kw Conv over that one channel
      with strides (sh, 3sw), weights ordered (row, column, channel): no Transpose to
      (B, 3, H, W) at all (measured: the Transpose was ~2.5 of the model's ~17 CPU µs per
      photo for pric-male@5).
    - "chw": the pixels transposed to (B, 3, H, W), as float ("pric_float").
    - None: nothing changed."""
    from onnx import helper, numpy_helper

    users = [n for n in graph.node if name in n.input]
    if len(users) != 1 or users[0].op_type != "Conv" or list(users[0].input[:1]) != [name]:
        return None
    conv = users[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if any(attrs.get("pads", [0])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") \
            or attrs.get("group", 1) != 1:
        return None
    inits = {i.name: i for i in graph.initializer}
    params = list(conv.input[1:])
    graph_inputs = {i.name for i in graph.input}  # old IRs list initializers as inputs too
    if not params or any(p not in inits or p in graph_inputs for p in params) or \
            any(p in n.input for n in graph.node if n is not conv for p in params):
        return None
    w = numpy_helper.to_array(inits[params[0]]).astype(np.float32)
    if w.ndim != 4 or w.shape[1] != 3:
        return None
    b = numpy_helper.to_array(inits[params[1]]).astype(np.float32) if len(params) > 1 else np.zeros(w.shape[0], np.float32)
    folded_w = (w * scale.reshape(1, 3, 1, 1)).astype(np.float32)
    folded_b = (b + (w * shift.reshape(1, 3, 1, 1)).sum(axis=(1, 2, 3))).astype(np.float32)
    layout = "rows" if all(d == 1 for d in attrs.get("dilations", [1, 1])) else "chw"
    if layout == "rows":
        out_ch, _, kh, kw = w.shape
        sh, sw = attrs.get("strides", [1, 1])
        folded_w = np.ascontiguousarray(folded_w.transpose(0, 2, 3, 1).reshape(out_ch, 1, kh, kw * 3))
        keep = [a for a in conv.attribute if a.name not in ("strides", "kernel_shape")]
        del conv.attribute[:]
        conv.attribute.extend([*keep, helper.make_attribute("strides", [sh, sw * 3]),
                               helper.make_attribute("kernel_shape", [kh, kw * 3])])
    for p in params:
        graph.initializer.remove(inits[p])
    graph.initializer.extend([numpy_helper.from_array(folded_w, "pric_conv_w"),
                              numpy_helper.from_array(folded_b, "pric_conv_b")])
    del conv.input[:]
    conv.input.extend([_ROWS if layout == "rows" else "pric_float", "pric_conv_w", "pric_conv_b"])
    return layout
