"""Export a checkpoint for deployment: ONNX, StableHLO (jax.export) or the authors' torch format.

    python -m cheapnet_jax.export --checkpoint runs/demo --format onnx --out cheapnet.onnx
    cheapnet-export --checkpoint runs/demo --format onnx --out cheapnet.onnx

- ``onnx``: a graph written directly with `onnx.helper` from the authors' tensor layout (Conv,
  ConvTranspose with groups, BatchNormalization, LeakyRelu, Concat, Sigmoid); input ``x``
  NCHW float32 ``[batch, 1, H, W]`` normalised, output ``probabilities`` ``[batch, 1, H, W]``;
  the batch dimension is dynamic. Runs in ONNX Runtime.
- ``stablehlo``: a serialized `jax.export` artifact of ``x [batch, H, W, 1] -> probabilities``
  with the weights baked in and a symbolic batch dimension; `load_stablehlo` reloads it and runs
  it without the model code.
- ``torch``: ``{"CheapNet": state_dict}`` that the authors' code loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax.checkpoints import load_checkpoint
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.files import write_atomic
from cheapnet_jax.model import BN_EPSILON, LEAKY_SLOPE, CheapNet, check_input_shape
from cheapnet_jax.torch_import import BLOCKS, TRANSPOSED_BLOCKS, features_of

ONNX_OPSET = 17
FORMATS = ("onnx", "stablehlo", "torch")
# Each decoder/output block reads the concatenation of a skip connection and the previous block.
_INPUTS = {
    "encoder1": ["x"],
    "encoder2": ["encoder1"],
    "encoder3": ["encoder2"],
    "encoder4": ["encoder3"],
    "bottleneck": ["encoder4"],
    "decoder1": ["bottleneck"],
    "decoder2": ["encoder4", "decoder1"],
    "decoder3": ["encoder3", "decoder2"],
    "decoder4": ["encoder2", "decoder3"],
    "output": ["encoder1", "decoder4"],
}


def to_onnx(variables: Mapping, image_size: int = 512):
    """An `onnx.ModelProto` of CheapNet with these variables (batch dimension dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cheapnet_jax.torch_import import variables_to_numpy_state_dict

    g = features_of(variables)
    state = variables_to_numpy_state_dict(variables)
    nodes, initializers = [], []

    def constant(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    for block in BLOCKS:
        sources = _INPUTS[block]
        source = sources[0]
        if len(sources) > 1:
            source = f"{block}_in"
            nodes.append(helper.make_node("Concat", sources, [source], axis=1))
        weight = constant(f"{block}.0.weight", state[f"{block}.0.weight"])
        bias = constant(f"{block}.0.bias", state[f"{block}.0.bias"])
        conv_out = f"{block}_conv"
        if block in TRANSPOSED_BLOCKS:
            op = "ConvTranspose"
            attributes = dict(
                group=g, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4, output_padding=[1, 1]
            )
        else:
            op = "Conv"
            k = state[f"{block}.0.weight"].shape[-1]
            full_resolution = block in ("encoder1", "output")  # dense, stride 1
            stride = 1 if full_resolution else 2
            attributes = dict(
                group=1 if full_resolution else g,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        nodes.append(helper.make_node(op, [source, weight, bias], [conv_out], **attributes))
        bn_inputs = [
            conv_out,
            *(
                constant(f"{block}.1.{n}", state[f"{block}.1.{n}"])
                for n in ("weight", "bias", "running_mean", "running_var")
            ),
        ]
        nodes.append(
            helper.make_node("BatchNormalization", bn_inputs, [f"{block}_bn"], epsilon=BN_EPSILON)
        )
        nodes.append(helper.make_node("LeakyRelu", [f"{block}_bn"], [block], alpha=LEAKY_SLOPE))
    nodes.append(helper.make_node("Sigmoid", ["output"], ["probabilities"]))
    shape = ["batch", 1, image_size, image_size]
    graph = helper.make_graph(
        nodes,
        f"CheapNet_G{g}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx.checker.check_model(model)
    return model


def to_stablehlo(model: CheapNet, variables: Mapping, image_size: int = 512) -> bytes:
    """Serialized `jax.export` of ``x [batch, H, W, 1] -> probabilities``, weights baked in."""
    weights = jax.tree.map(jnp.asarray, variables)

    def probabilities(x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(model.apply(weights, x, train=False))

    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 1), jnp.float32)
    return bytes(jax.export.export(jax.jit(probabilities))(spec).serialize())


def load_stablehlo(path: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
    """The exported function, callable on ``[batch, H, W, 1]`` float32 input."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    return exported.call


def export_checkpoint(checkpoint: str, fmt: str, out: str, image_size: int = 512) -> Path:
    """Write ``checkpoint`` (authors' .pkl or a workdir) as ``fmt`` to ``out``; nothing is
    written for an ``image_size`` the network cannot take (not a multiple of 16)."""
    if fmt not in FORMATS:
        raise SettingsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_input_shape((1, image_size, image_size, 1))
    loaded = load_checkpoint(checkpoint)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        write_atomic(out_path, to_onnx(loaded.variables, image_size).SerializeToString())
    elif fmt == "stablehlo":
        reference = CheapNet(loaded.model.features, impl="lax")  # portable to any backend
        write_atomic(out_path, to_stablehlo(reference, loaded.variables, image_size))
    else:  # torch
        from cheapnet_jax.torch_import import save_torch_checkpoint

        save_torch_checkpoint(loaded.variables, out_path)
    return out_path


if __name__ == "__main__":
    # `python -m cheapnet_jax.export`: the command-line tool (imported here, not above, since
    # the command module imports this one).
    from cheapnet_jax.cli.export import main

    sys.exit(main())
