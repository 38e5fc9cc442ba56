"""A tiny stand-in for rembg's u2net model, so background removal runs offline in tests.

The real u2net.onnx is 176 MB and rembg downloads it from GitHub; tests and offline smoke
runs use this ~1 KB model instead, with the same signature (input "input.1" float32
[1, 3, 320, 320] -> outputs d0..d6 float32 [1, 1, 320, 320]). rembg reads only `d0` and
min-max normalises it, so the output must depend on the input (a constant output divides
by zero and gives a NaN mask). Here a 1x1
convolution averages the normalised RGB with a large gain, then a sigmoid: bright pixels get
alpha near 255 and dark ones near 0, so "a bright object on a dark background" segments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 320
"""u2net's fixed input side; rembg resizes every image to SIZE x SIZE."""

OUTPUTS = tuple(f"d{i}" for i in range(7))
"""u2net's seven side outputs; rembg uses only the first."""

GAIN = 4.0
"""Per-pixel gain on the mean of the normalised channels: +-2 after rembg's normalisation
becomes +-8 before the sigmoid, so object and background land near 1 and 0."""

BIAS = 0.0

# Pinned so that the file loads on onnxruntime releases older than this onnx package.
IR_VERSION = 8
OPSET = 13


def build_tiny_u2net() -> onnx.ModelProto:
    """The tiny u2net-signature model (see the module docstring).

    Returns:
        A checked `onnx.ModelProto`.
    """
    weight = numpy_helper.from_array(np.full((1, 3, 1, 1), GAIN / 3.0, dtype=np.float32), name="conv.weight")
    bias = numpy_helper.from_array(np.array([BIAS], dtype=np.float32), name="conv.bias")
    shape_in = [1, 3, SIZE, SIZE]
    shape_out = [1, 1, SIZE, SIZE]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv.weight", "conv.bias"], ["logits"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["logits"], ["d0"]),
        # The other side outputs only have to exist with the right shape.
        *(helper.make_node("Identity", ["d0"], [name]) for name in OUTPUTS[1:]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_u2net",
        inputs=[helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape_in)],
        outputs=[helper.make_tensor_value_info(name, TensorProto.FLOAT, shape_out) for name in OUTPUTS],
        initializer=[weight, bias],
    )
    model = helper.make_model(
        graph,
        producer_name="kiln-tiny-u2net",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_u2net(path: Path) -> Path:
    """Write the tiny u2net-signature ONNX model to `path` (same bytes on every call).

    Put it where rembg looks (for example `<U2NET_HOME>/u2net.onnx`) or pass it as the
    mesh server's `rembg_model_path`.

    Args:
        path: Destination file; parent directories are created.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_tiny_u2net().SerializeToString(deterministic=True))
    return path
