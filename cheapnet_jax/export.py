"""Export a checkpoint for deployment: ONNX, StableHLO (jax.export) or the authors' torch format.

    python -m cheapnet_jax.cli.export --checkpoint runs/demo --format onnx --out cheapnet.onnx
    cheapnet-export --checkpoint runs/demo --format onnx --out cheapnet.onnx

- ``onnx``: a graph written directly with `onnx.helper` from the authors' tensor layout (Conv,
  ConvTranspose with groups, BatchNormalization, LeakyRelu, Concat, Sigmoid); input ``x``
  NCHW float32 ``[batch, 1, H, W]`` normalised, output ``probabilities`` ``[batch, 1, H, W]``;
  the batch dimension is dynamic. Runs in ONNX Runtime.
- ``stablehlo``: a serialized `jax.export` artifact of ``x [batch, H, W, 1] -> probabilities``
  with the weights baked in and a symbolic batch dimension; `load_stablehlo` reloads it and runs
  it without the model code.
- ``stablehlo --pipeline``: the whole detector in one artifact, from uint8 images
  ``[batch, H, W]`` (any H, W fixed at export; padded inside as `predict.py` pads them) to
  ``{"masks", "boxes", "areas", "scores", "valid", "overflow"}`` (`PIPELINE_OUTPUTS`), with the
  normalisation, threshold, minimum area and component cap baked in. The labeler is the
  union-find (no host callback, so the artifact runs on any backend). At export time the
  reloaded artifact runs on a few images and is compared with the JAX pipeline (`predict.py`'s
  detector); the comparison is written beside the artifact as ``<out>.parity.json``.
- ``torch``: ``{"CheapNet": state_dict}`` that the authors' code loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax import data
from cheapnet_jax.checkpoints import load_checkpoint
from cheapnet_jax.detection import (
    detections_from_probabilities,
    network_probabilities,
)
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.files import write_atomic
from cheapnet_jax.inspection import Inspector
from cheapnet_jax.model import (
    BN_EPSILON,
    LEAKY_SLOPE,
    SIZE_MULTIPLE,
    CheapNet,
    check_input_shape,
)
from cheapnet_jax.synthetic import make_split
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


PIPELINE_OUTPUTS = {
    "masks": "bool [batch, H, W]: probability > threshold",
    "boxes": "int32 [batch, K, 4]: x1, y1, x2, y2, inclusive, raster order of first pixel",
    "areas": "int32 [batch, K]: pixels per defect",
    "scores": "float32 [batch, K]: mean probability inside each defect",
    "valid": "bool [batch, K]: a defect of at least min_area pixels",
    "overflow": "int32 [batch]: components beyond K, not reported",
}


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline artifact bakes in; the defaults are `predict.py`'s."""

    height: int
    width: int
    mean: float
    std: float
    threshold: float = 0.5
    min_area: int = 0
    max_components: int = 256
    connectivity: int = 8


def pad_on_device(pixels: jax.Array) -> jax.Array:
    """`data.pad_to_multiple` inside a program: ``[B, H, W]`` padded at the bottom and
    right to multiples of 16, each axis by reflection or, too short to reflect, its edge."""
    for axis in (1, 2):
        size = pixels.shape[axis]
        pad = -size % SIZE_MULTIPLE
        widths = [(0, 0)] * 3
        widths[axis] = (0, pad)
        if pad:
            pixels = jnp.pad(pixels, widths, mode="reflect" if size > pad else "edge")
    return pixels


def pipeline_function(
    model: CheapNet, variables: Mapping, settings: PipelineSettings
) -> Callable[[jax.Array], dict]:
    """uint8 ``[batch, H, W]`` -> `PIPELINE_OUTPUTS`, without host callbacks."""
    weights = jax.tree.map(jnp.asarray, variables)

    def pipeline(pixels: jax.Array) -> dict:
        probabilities = network_probabilities(
            model, weights, pad_on_device(pixels), normalization=(settings.mean, settings.std)
        )[:, : settings.height, : settings.width]
        found = detections_from_probabilities(
            probabilities,
            threshold=settings.threshold,
            max_components=settings.max_components,
            min_area=settings.min_area,
            connectivity=settings.connectivity,
            method="union_find",
        )
        return {
            "masks": found.masks,
            "boxes": found.stats[..., :4],
            "areas": found.stats[..., 4],
            "scores": found.scores,
            "valid": found.valid,
            "overflow": found.overflow,
        }

    return pipeline


def load_stablehlo_pipeline(path: str | os.PathLike) -> Callable[[np.ndarray], dict]:
    """The exported pipeline, callable on uint8 ``[batch, H, W]``; returns `PIPELINE_OUTPUTS`."""
    return load_stablehlo(path)


def pipeline_parity(
    run_artifact: Callable[[np.ndarray], dict], inspector: Inspector, images: np.ndarray
) -> dict:
    """The artifact against the `Inspector` with the same settings (what predict.py and the
    service answer) on uint8 ``images [N, H, W]``: per image whether the defects (boxes,
    areas) are equal, the largest score difference, and the fraction of equal mask pixels."""
    expected = inspector.inspect(images, keep_masks=True)
    rows = []
    for index, (image, want) in enumerate(zip(images, expected, strict=True)):
        got = jax.device_get(run_artifact(image[None]))
        valid = got["valid"][0]
        found = [
            (tuple(int(v) for v in box), int(area), float(score))
            for box, area, score in zip(
                got["boxes"][0][valid],
                got["areas"][0][valid],
                got["scores"][0][valid],
                strict=True,
            )
        ]
        same = [(box, area) for box, area, _ in found] == [(d.box, d.area) for d in want.defects]
        rows.append(
            {
                "image": index,
                "defects": len(want.defects),
                "same_defects": same,
                # the inspector's scores are rounded to 6 digits, as predict.py writes them
                "max_score_difference": max(
                    (abs(f[2] - d.score) for f, d in zip(found, want.defects, strict=False)),
                    default=0.0,
                ),
                "mask_agreement": float(np.mean(got["masks"][0] == want.mask)),
            }
        )
    return {"images": rows, "all_same_defects": all(r["same_defects"] for r in rows)}


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


def parity_images(
    paths: list[str], height: int, width: int, count: int = 3
) -> tuple[np.ndarray, str]:
    """uint8 ``[N, height, width]`` to check an artifact on, and where they came from: the
    given image files (each must be height x width), else synthetic defective images."""
    if paths:
        images = []
        for path in paths:
            image = data.load_image(path, convert_to_grayscale=True)[0]
            if image.shape != (height, width):
                raise SettingsError(
                    f"{path}: {image.shape[0]}x{image.shape[1]} pixels, but the pipeline is "
                    f"exported for {height}x{width} (--image-size)"
                )
            images.append(image)
        return np.stack(images), "files: " + ", ".join(paths)
    side = -(-max(height, width) // SIZE_MULTIPLE) * SIZE_MULTIPLE
    images = make_split("test", count, side, seed=0)[0][:, :height, :width]
    return images, f"{count} synthetic test images (cheapnet_jax.synthetic)"


def pipeline_settings(inspector: Inspector, height: int, width: int) -> PipelineSettings:
    """What a pipeline artifact of ``inspector`` for ``height x width`` images bakes in: the
    inspector's normalisation, threshold, min_area and max_components."""
    return PipelineSettings(
        height=height,
        width=width,
        mean=inspector.normalization.mean,
        std=inspector.normalization.std,
        threshold=inspector.threshold,
        min_area=inspector.min_area,
        max_components=inspector.options.max_components,
    )


def export_pipeline(
    inspector: Inspector,
    out: str,
    height: int,
    width: int,
    *,
    platforms: tuple[str, ...] | None = None,
    parity_paths: list[str] = (),
) -> tuple[Path, dict]:
    """Write the pipeline artifact of ``inspector``'s model and settings for ``height x
    width`` images to ``out`` and its parity report to ``<out>.parity.json``; returns the
    artifact's path and the report."""
    loaded = inspector.loaded
    settings = pipeline_settings(inspector, height, width)
    images, origin = parity_images(list(parity_paths), height, width)
    function = jax.jit(pipeline_function(loaded.model, loaded.variables, settings))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, height, width), jnp.uint8)
    artifact = bytes(jax.export.export(function, platforms=platforms)(spec).serialize())
    reloaded = jax.export.deserialize(bytearray(artifact))
    report = {
        "artifact": Path(out).name,
        "checkpoint": loaded.source,
        "settings": asdict(settings),
        "platforms": list(reloaded.platforms),
        "outputs": PIPELINE_OUTPUTS,
        "parity_images": origin,
    }
    if jax.default_backend() in reloaded.platforms:
        report |= pipeline_parity(reloaded.call, inspector, images)
    else:
        report["all_same_defects"] = None  # not runnable here: checked where it runs
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, artifact)
    write_atomic(parity_path(out_path), json.dumps(report, indent=2) + "\n")
    return out_path, report


def parity_path(artifact: Path) -> Path:
    """Where the parity report of an artifact is written: ``<artifact>.parity.json``."""
    return artifact.with_name(artifact.name + ".parity.json")
