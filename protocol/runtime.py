"""The ONNX runner, defined once: the participant's device, the auditor and the exporter's
parity check all run a model file through `OnnxModel`, with the same session options.

onnxruntime is imported when a model is opened, so the rest of `protocol` needs only numpy
and Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.errors import ModelIntegrityError
from protocol.model_card import InputSpec
from protocol.preprocess import normalize


def model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """What the card's graph takes for prepared pixels uint8 (N, H, W, 3): the pixels as
    they are (input dtype "uint8": the normalisation is inside the graph) or
    protocol.preprocess.normalize of them (older "float32" graphs)."""
    if spec.dtype == "uint8":
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    return normalize(pixels, spec)


class OnnxModel:
    """An ONNX graph run with onnxruntime on the CPU, one named input and output."""

    def __init__(self, path: str | Path, input_name: str | None = None, output_name: str | None = None,
                 threads: int = 0, graph: bytes | None = None) -> None:
        """`graph`: serialized ONNX to run instead of the file's (built from it, e.g. by
        pixel_input_graph); `path` still names the model in errors."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # idle onnxruntime threads must not spin: on a small CPU they would steal the cores
        # that decode the next photos (measured: pipeline 2x slower with spinning)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(graph if graph is not None else str(path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelIntegrityError(f"{path}: onnxruntime cannot load the model ({type(exc).__name__})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name if input_name in inputs else inputs[0]
        self.output_name = output_name if output_name in outputs else outputs[0]
        if input_name and input_name not in inputs:
            raise ModelIntegrityError(f"{path}: no input named {input_name!r} (has {inputs})")
        if output_name and output_name not in outputs:
            raise ModelIntegrityError(f"{path}: no output named {output_name!r} (has {outputs})")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_batched(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model on x (N, ...) in chunks of `batch_size`; float32 (N, ...) out."""
        out = [np.asarray(self(x[i:i + batch_size]), dtype=np.float32) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
