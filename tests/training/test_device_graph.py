"""The device graph: normalisation moved inside an exported float graph (training.device_graph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.device_graph import PIXELS, device_graph


@pytest.mark.parametrize(("kernel", "strides", "pads", "dilations", "layout"), [
    ((4, 4), (4, 4), 0, (1, 1), "rows"),  # pric-male@5's stem
    ((3, 5), (2, 1), 0, (1, 1), "rows"),  # rectangular kernel, column stride 1
    ((3, 3), (1, 1), 0, (2, 1), "chw"),  # dilated: folded, transposed
    ((4, 4), (4, 4), 1, (1, 1), "plain"),  # padded: Mul and Add stay
])
def test_the_device_graph_folds_the_normalisation_into_an_unpadded_first_conv_only(
        tmp_path: Path, kernel: tuple, strides: tuple, pads: int, dilations: tuple, layout: str) -> None:
    """Unpadded first Conv: normalisation folded into its weights (no Mul/Add left), and
    without dilation it reads the pixel rows as they are (no Transpose); padded: Mul and Add
    stay (folding would be wrong at the borders). Same outputs every way, on a photo that
    is not square (a height/width mix-up fails)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from protocol.model_card import InputSpec
    from protocol.preprocess import normalize

    rng = np.random.default_rng(pads + 2 * strides[1])
    spec = InputSpec(height=48, width=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    w = numpy_helper.from_array(rng.standard_normal((4, 3, *kernel)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    conv = helper.make_node("Conv", ["image", "w", "b"], ["feature"], kernel_shape=list(kernel), strides=list(strides),
                            pads=[pads] * 4, dilations=list(dilations))
    out = [(n + 2 * pads - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip((48, 64), kernel, strides, dilations)]
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 48, 64])],
                              [helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["N", 4, *out])],
                              initializer=[w, b])
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain.ir_version = 8
    fused = device_graph(plain.SerializeToString(), spec)
    ops = [n.op_type for n in onnx.load_from_string(fused).graph.node]
    assert ("Mul" in ops) == (layout == "plain") and ("Add" in ops) == (layout == "plain")
    assert ("Transpose" in ops) == (layout != "rows")
    pixels = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": normalize(pixels, spec)})[0]
    got = ort.InferenceSession(fused, providers=["CPUExecutionProvider"]).run(None, {PIXELS: pixels})[0]
    assert got.shape == want.shape == (5, 4, *out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
