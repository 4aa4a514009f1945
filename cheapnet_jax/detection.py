"""Images -> probabilities -> mask -> defects ``[x1, y1, x2, y2, area]``, in one jitted program."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax import data
from cheapnet_jax.labeling import (
    Method,
    SetPixels,
    block_pixels,
    component_segments,
    foreground_stats,
    label_and_measure,
    opencv_available,
    opencv_labels,
    overflow_of,
    set_pixels,
)
from cheapnet_jax.model import CheapNet, fold_batch_norm, inference_logits


class Detections(NamedTuple):
    """Detector output for a batch; K = max_components.

    probabilities: float [B, H, W]; masks: bool [B, H, W] (probability > threshold);
    labels: int32 [B, H, W] (0 background, 1..n raster order); stats: int32 [B, K, 5] rows
    ``[x1, y1, x2, y2, area]`` with inclusive corners; scores: float [B, K], the mean
    probability inside each component; valid: bool [B, K] (a component exists and its area is
    >= min_area); overflow: int32 [B], components beyond K that are not in ``stats``.
    """

    probabilities: jax.Array
    masks: jax.Array
    labels: jax.Array
    stats: jax.Array
    scores: jax.Array
    valid: jax.Array
    overflow: jax.Array


def component_sums(
    labels: jax.Array, values: jax.Array, max_components: int, connectivity: int = 8
) -> jax.Array:
    """Sums ``[B, K]`` of ``values [B, H, W]`` over each of the first K components of
    ``labels [B, H, W]``, a labeling with ``connectivity`` (4 or 8).

    Reduced per block first, as the labeler's statistics are: the set pixels of a 2x2 block
    (8-connectivity) or of a 1x2 block (4-connectivity) always belong to one component, so a
    block sends one update with its label (the largest in the block) and the sum of its set
    pixels' values: 4x (2x) fewer updates than pixels. Background blocks and components beyond
    max_components go out of range and are dropped (no hot spot on an accelerator).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    batch = labels.shape[0]
    block_labels = functools.reduce(jnp.maximum, block_pixels(labels, connectivity).values())
    set_values = block_pixels(jnp.where(labels > 0, values, 0), connectivity).values()
    block_sums = functools.reduce(jnp.add, set_values)
    return (
        jnp.zeros((batch * max_components,), values.dtype)
        .at[component_segments(block_labels, max_components)]
        .add(block_sums.reshape(-1), mode="drop")
        .reshape(batch, max_components)
    )


def detections_from_probabilities(
    probabilities: jax.Array,
    *,
    threshold: float = 0.5,
    max_components: int = 256,
    min_area: int = 0,
    connectivity: int = 8,
    method: Method = "auto",
) -> Detections:
    """Threshold, label and measure the components of probability maps ``[B, H, W]``."""
    masks = probabilities > threshold
    labels, _, (stats, valid, overflow) = label_and_measure(
        masks, connectivity, max_components, method=method
    )
    area = stats[..., 4]
    sums = component_sums(labels, probabilities, max_components, connectivity)
    scores = jnp.where(valid, sums / jnp.maximum(area, 1).astype(sums.dtype), 0)
    valid = valid & (area >= min_area)
    return Detections(probabilities, masks, labels, stats, scores, valid, overflow)


LABELS_ON_HOST_UP_TO = 8
"""The widths G for which the CPU runs the network alone and labels on the host by default
(`labels_on_host`), so that the labeling of one batch overlaps the network of the next (the
service, predict.py). Measured on AMD EPYC (AVX2, 2 cores), batches of 8 images of 512x512:
the labeling is 13-28% of a batch's time for G = 1-8; for G = 16 and 32 it is 6% and 3%, and
for G = 32 the two parts also left about 0.7 GB more resident in a service (its 145 MiB of
temporaries and the host's arrays interleave on the heap `cheapnet_jax.host_allocator` keeps;
BENCHMARKS.md)."""


def labels_on_host(features: int, on_cpu: bool, wanted: bool | None = None) -> bool:
    """Whether to run the network alone (`make_network`) and label on the host
    (`detections_on_host`): as ``wanted``, or when None for widths up to `LABELS_ON_HOST_UP_TO`;
    only on the CPU, with OpenCV (elsewhere the detector labels on the device)."""
    if wanted is None:
        wanted = features <= LABELS_ON_HOST_UP_TO
    return wanted and on_cpu and opencv_available()


def detections_on_host(
    probabilities: np.ndarray,
    *,
    threshold: float = 0.5,
    max_components: int = 256,
    min_area: int = 0,
) -> Detections:
    """`detections_from_probabilities` of float32 probabilities ``[B, H, W]`` on the host, in
    the calling thread (numpy and OpenCV, no XLA program; 8-connectivity): the arrays the CPU's
    jitted form computes, scores to the bit (tested against `make_detector`). For a service that
    labels one batch while the device runs the network of the next. Needs OpenCV."""
    probabilities = np.asarray(probabilities, np.float32)
    masks = probabilities > np.float32(threshold)  # the jitted form's weakly typed compare
    labels, counts = opencv_labels(masks, 8)
    pixels = set_pixels(masks, labels)  # boxes, areas and sums over these only
    stats = foreground_stats(pixels, len(masks), max_components)
    area = stats[..., 4]
    valid = area > 0
    sums = _component_sums_on_host(pixels, labels.shape, probabilities, max_components)
    scores = np.where(valid, sums / np.maximum(area, 1).astype(np.float32), np.float32(0))
    overflow = overflow_of(counts, max_components)
    return Detections(
        probabilities, masks, labels, stats, scores, valid & (area >= min_area), overflow
    )


def _component_sums_on_host(
    pixels: SetPixels, shape: tuple[int, int, int], values: np.ndarray, max_components: int
) -> np.ndarray:
    """`component_sums` (8-connectivity) of ``values [B, H, W]`` over the labeled set pixels,
    float32 to the bit: each 2x2 block's set values added in the jitted form's order (its
    pixels (0, 0), (0, 1), (1, 0), (1, 1): raster order), then the blocks' sums added to their
    component one after another in raster order of the blocks, as XLA:CPU's scatter adds its
    updates."""
    batch, height, width = shape
    block_rows, block_cols = (height + 1) // 2, (width + 1) // 2
    block = (pixels.image * block_rows + pixels.row // 2) * block_cols + pixels.col // 2
    block_sums = np.zeros(batch * block_rows * block_cols, np.float32)
    np.add.at(block_sums, block, values.reshape(-1)[pixels.index])
    block_labels = np.zeros(block_sums.shape, np.int32)
    block_labels[block] = pixels.label  # one component per block
    occupied = np.zeros(block_sums.shape, bool)
    occupied[block] = True
    occupied = np.flatnonzero(occupied)  # raster order of the blocks
    label = block_labels[occupied]
    kept = label <= max_components
    segment = occupied[kept] // (block_rows * block_cols) * max_components + label[kept] - 1
    sums = np.zeros(batch * max_components, np.float32)
    np.add.at(sums, segment, block_sums[occupied[kept]])
    return sums.reshape(batch, max_components)


INFERENCE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""What the network may store its activations in at inference (``--dtype``); every block
computes in float32, and probabilities, thresholds and scores are float32 either way."""


def normalization_table(mean: float, std: float) -> np.ndarray:
    """float32 ``[256]``: the normalised value of every pixel value, computed on the host by
    `cheapnet_jax.data.normalize` (what a program looks up, see `normalize_on_device`)."""
    return data.normalize(np.arange(256, dtype=np.uint8), mean, std)[:, 0]


def normalize_on_device(pixels: jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 ``[B, H, W]`` -> float32 ``[B, H, W, 1]`` inside the compiled program (a quarter
    of the bytes cross from host to device), bit for bit `cheapnet_jax.data.normalize`.

    A 256-entry table computed on the host with that very function, then looked up: XLA turns
    a division by a constant into a multiplication by its reciprocal, which is off by an ulp
    for some pixel values, and a trained network can amplify an ulp of input.
    """
    return jnp.asarray(normalization_table(mean, std))[pixels][..., None]


def network_probabilities(
    model: CheapNet,
    variables: Mapping,
    x: jax.Array,
    *,
    dtype: str = "float32",
    normalization: tuple[float, float] | None = None,
    fold: bool = True,
) -> jax.Array:
    """Probabilities float32 ``[B, H, W]`` of float ``[B, H, W, 1]`` normalised images or of
    uint8 ``[B, H, W]`` pixels (normalised on the device with ``normalization``), the network
    storing its activations in ``dtype`` (`INFERENCE_DTYPES`, see `CheapNet.activation_dtype`),
    with its BatchNorm folded into the convolutions unless ``fold=False``. The detector's first
    step."""
    if x.dtype == jnp.uint8:
        if normalization is None:
            raise ValueError("uint8 images need make_detector(normalization=(mean, std))")
        x = normalize_on_device(x, *normalization)
    if fold and not model.folded:
        # One multiply-add fewer per activation: 1.16-1.50x the images/s at batch 8 on the CPU,
        # no measurable difference at batches 1-4 (BENCHMARKS.md); the same logits up to float32
        # rounding. Folded inside the traced program, so callers keep passing the checkpoint's
        # variables.
        model, variables = model.clone(folded=True), fold_batch_norm(variables)
    model = model.clone(activation_dtype=INFERENCE_DTYPES[dtype])
    logits = inference_logits(model, variables, x.astype(jnp.float32))
    return jax.nn.sigmoid(logits.astype(jnp.float32))[..., 0]


def cropped_probabilities(
    model: CheapNet,
    variables: Mapping,
    x: jax.Array,
    crop: tuple[int, int] | None = None,
    **options,
) -> jax.Array:
    """`network_probabilities` (its keyword ``options``) keeping the top-left ``crop=(height,
    width)``: the detector's first step."""
    probabilities = network_probabilities(model, variables, x, **options)
    return probabilities if crop is None else probabilities[:, : crop[0], : crop[1]]


def make_network(
    model: CheapNet,
    *,
    dtype: str = "float32",
    normalization: tuple[float, float] | None = None,
    fold: bool = True,
) -> Callable[..., jax.Array]:
    """A jitted ``(variables, x, crop=None) -> probabilities [B, H, W]``: `make_detector`'s
    network alone (its arguments and crop), for `detections_on_host`."""
    check_dtype(dtype)
    options = {"dtype": dtype, "normalization": normalization, "fold": fold}

    @functools.partial(jax.jit, static_argnames="crop")
    def probabilities_of(
        variables: Mapping, x: jax.Array, crop: tuple[int, int] | None = None
    ) -> jax.Array:
        return cropped_probabilities(model, variables, x, crop, **options)

    return probabilities_of


def check_dtype(dtype: str) -> None:
    """ValueError unless ``dtype`` is one of `INFERENCE_DTYPES`."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")


def make_detector(
    model: CheapNet,
    *,
    threshold: float = 0.5,
    max_components: int = 256,
    min_area: int = 0,
    connectivity: int = 8,
    method: Method = "auto",
    dtype: str = "float32",
    normalization: tuple[float, float] | None = None,
    fold: bool = True,
) -> Callable[[Mapping, jax.Array], Detections]:
    """A jitted ``(variables, x, crop=None) -> Detections``.

    ``x`` is either float ``[B, H, W, 1]``, already normalised, or the raw uint8 pixels
    ``[B, H, W]``, normalised on the device with ``normalization=(mean, std)``. The network
    stores its activations in ``dtype`` (see `INFERENCE_DTYPES`), BatchNorm folded unless
    ``fold=False`` (see `network_probabilities`). ``crop=(height, width)`` keeps the top-left
    corner of the probabilities before thresholding: for images padded up to a multiple of 16,
    so that no defect comes from the padding (one compiled program per crop).
    """
    check_dtype(dtype)
    options = {"dtype": dtype, "normalization": normalization, "fold": fold}

    @functools.partial(jax.jit, static_argnames="crop")
    def detector(
        variables: Mapping, x: jax.Array, crop: tuple[int, int] | None = None
    ) -> Detections:
        probabilities = cropped_probabilities(model, variables, x, crop, **options)
        return detections_from_probabilities(
            probabilities,
            threshold=threshold,
            max_components=max_components,
            min_area=min_area,
            connectivity=connectivity,
            method=method,
        )

    return detector


def detect(model: CheapNet, variables: Mapping, x: jax.Array, **options) -> Detections:
    """One-off detection; for repeated calls keep the function of `make_detector`."""
    return make_detector(model, **options)(variables, x)
