"""The graph a device runs: an exported float graph with the normalisation moved inside.

pric-export writes this graph as the model file (card input dtype "uint8"): the prepared
pixels go in as they are, so the sha256 in the card covers the whole transform after
resizing, and the client and the auditor run the very same bytes without rewriting them.

    python -m training.device_graph exported_models/pric-male --version 6
        re-writes an older float-input export in place (new model.onnx, card with
        dtype "uint8", the new sha256 and version), after checking that it gives the old
        graph's outputs on real photos.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from protocol.errors import InvalidInputError, ModelIntegrityError, PricError
from protocol.model_card import InputSpec, load_card, sha256_file
from protocol.preprocess import normalize
from protocol.runtime import OnnxModel

# the uint8 input of a device graph
PIXELS = "pixels"
PARITY_TOL = 1e-4


def pixel_input_graph(model_bytes: bytes, spec: InputSpec, input_name: str = PIXELS) -> bytes | None:
    """The model file's ONNX graph with protocol.preprocess.normalize moved inside it:
    input `input_name` uint8 (B, H, W, 3) → Transpose → Cast → ·1/(255·std) + (−mean/std) → the
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
    graph.input.insert(0, helper.make_tensor_value_info(input_name, TensorProto.UINT8, ["B", spec.height, spec.width, 3]))
    folded = _fold_into_first_conv(graph, spec.name, scale, shift)
    if folded == "rows":  # the Conv reads (B, 1, H, W·3): a free reshape of the pixels
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, 1, spec.height, spec.width * 3], np.int64), "pric_rows_shape"))
        nodes = [helper.make_node("Cast", [input_name], ["pric_hwc"], to=TensorProto.FLOAT),
                 helper.make_node("Reshape", ["pric_hwc", "pric_rows_shape"], [_ROWS])]
    else:
        nodes = [helper.make_node("Transpose", [input_name], ["pric_chw"], perm=[0, 3, 1, 2]),
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


def device_graph(model_bytes: bytes, spec: InputSpec) -> bytes:
    """The float-input graph `model_bytes` (input spec.name, float32 (N, 3, H, W)) as a
    device graph (input PIXELS, uint8 (N, H, W, 3)); ModelIntegrityError when it cannot."""
    out = pixel_input_graph(model_bytes, spec, PIXELS)
    if out is None:
        raise ModelIntegrityError(f"the graph's input {spec.name!r} is not float32 (N, 3, {spec.height}, "
                                  f"{spec.width}); cannot put the normalisation inside")
    return out


def max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max()) if got.size else 0.0


def device_parity(float_path: Path, device_path: Path, spec: InputSpec, pixels: np.ndarray, output: str,
                  compare: Callable[[np.ndarray, np.ndarray], float] = max_abs_diff) -> float:
    """`compare(device outputs, float outputs)` (default: max abs difference) of the device
    graph on uint8 pixels (N, H, W, 3) and the float graph on normalize(pixels)."""
    want = np.asarray(OnnxModel(float_path, spec.name, output)(normalize(pixels, spec)), np.float32)
    got = np.asarray(OnnxModel(device_path, PIXELS, output)(np.ascontiguousarray(pixels, np.uint8)), np.float32)
    if got.shape != want.shape:
        raise ModelIntegrityError(f"{device_path}: output shape {got.shape} differs from the float graph's {want.shape}")
    return compare(got, want)


def make_device_file(path: Path, spec: InputSpec, pixels: np.ndarray, output: str,
                     compare: Callable[[np.ndarray, np.ndarray], float] = max_abs_diff) -> tuple[InputSpec, float]:
    """Replace the float graph at `path` by its device graph, after checking on `pixels`
    (prepared uint8 photos) that both give the same outputs. Returns the device graph's
    input spec (dtype uint8, input PIXELS) and the largest difference."""
    tmp = path.with_name(path.name + ".device")
    tmp.write_bytes(device_graph(path.read_bytes(), spec))
    diff = device_parity(path, tmp, spec, pixels, output, compare)
    if not diff <= PARITY_TOL:
        tmp.unlink()
        raise ModelIntegrityError(f"{path}: the device graph differs from the float graph by {diff:.2e} > {PARITY_TOL}")
    tmp.replace(path)
    return replace(spec, dtype="uint8", name=PIXELS), diff


def upgrade(model_dir: Path, version: str, data: str | None = None) -> Path:
    """Re-write an exported model whose card input is float32 as a device graph, in place."""
    from protocol.datasets import default_data_dir, load_faces

    card = load_card(model_dir)
    if card.input.dtype == "uint8":
        raise InvalidInputError(f"{model_dir}: {card.model_id} already takes uint8 pixels")
    pixels = load_faces(data or default_data_dir(), card.input, limit=64, progress=False, announce=False).pixels
    src = model_dir / card.file
    compare = max_abs_diff
    if card.kind == "sparse_code":  # top-k ties may pick other positions: compare on the common support
        from training.sparse.export import code_difference as compare
    spec, diff = make_device_file(src, card.input, pixels, card.output.name, compare)
    new = replace(card, version=str(version), sha256=sha256_file(src), input=spec,
                  audit={}, training={**card.training, "device_graph": {"from_sha256": card.sha256,
                                                                         "max_abs_diff": diff}}).validate()
    new.save(model_dir)
    return model_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.device_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="an exported model folder whose card input is float32")
    p.add_argument("--version", required=True, help="the card's new version (the bytes change, so must the id)")
    p.add_argument("--data", default=None, help="photos for the parity check (default: $PRIC_DATA or celeba-10k)")
    args = p.parse_args(argv)
    try:
        upgrade(Path(args.model_dir), args.version, args.data)
    except PricError as exc:
        print(f"device_graph: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"model": load_card(Path(args.model_dir)).model_id, "sha256": sha256_file(Path(args.model_dir) / "model.onnx")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
