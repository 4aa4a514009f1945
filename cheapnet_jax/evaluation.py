"""Evaluate CheapNet on a DAGM folder: segmentation metrics, parameters and GFLOPs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cheapnet_jax import data, metrics
from cheapnet_jax.model import CheapNet

PAPER_FLOPS_PER_G = 12_686_336
PAPER_FLOPS_CONSTANT = 1_048_576
PAPER_IMAGE_PIXELS = 512 * 512
# Activation budget used to pick a batch size: one [B, H, W, G] float32 map of about 256 MiB.
_ACTIVATION_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Normalization:
    """``(pixel / 255 - mean) / std``; defaults are the authors' Class-6 statistics."""

    mean: float = data.CLASS6_MEAN
    std: float = data.CLASS6_STD


def count_params(variables: Mapping) -> int:
    """Number of trainable parameters (the ``params`` collection)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"])))


def paper_gflops(features: int, height: int = 512, width: int = 512) -> float:
    """The paper's GFLOPs per image (thop: conv multiply-adds without bias + 4 per BN element).

    12,686,336*G + 1,048,576 at 512x512; every term scales with the pixel count.
    """
    per_512 = PAPER_FLOPS_PER_G * features + PAPER_FLOPS_CONSTANT
    return per_512 * (height * width) / PAPER_IMAGE_PIXELS / 1e9


def xla_gflops(model: CheapNet, variables: Mapping, height: int = 512, width: int = 512) -> float:
    """GFLOPs per image that XLA's cost analysis counts for the compiled inference pass.

    XLA counts a multiply-add as 2 FLOPs and includes bias, BatchNorm, LeakyReLU and sigmoid.
    """
    spec = jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32)
    lowered = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x))).lower(variables, spec)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / 1e9


def default_batch_size(features: int, height: int = 512, width: int = 512) -> int:
    """A batch size that keeps one activation map near 256 MiB (1 for G >= 256 at 512x512)."""
    per_image = features * height * width * 4
    return int(max(1, min(16, _ACTIVATION_BUDGET_BYTES // per_image)))


def make_probability_fn(model: CheapNet) -> Callable[[Mapping, jax.Array], jax.Array]:
    """jit-compiled ``(variables, x [B, H, W, 1]) -> sigmoid probabilities [B, H, W]``."""

    @jax.jit
    def probabilities(variables: Mapping, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(model.apply(variables, x, train=False))[..., 0]

    return probabilities


def pad_batch(array: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad axis 0 to ``batch_size`` with zeros, so that every batch has one compiled shape."""
    missing = batch_size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


def evaluate_segmentation(
    model: CheapNet,
    variables: Mapping,
    folder: str | os.PathLike,
    *,
    normalization: Normalization = Normalization(),
    threshold: float = 0.5,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Confusion matrix summed over every image of a DAGM folder (prediction: p > threshold).

    Returns the figures of `metrics.segmentation_metrics` plus ``images`` and the raw counts.
    """
    samples = data.list_dagm_samples(folder)
    if batch_size is None:
        batch_size = default_batch_size(model.features)
    probabilities_of = make_probability_fn(model)
    totals = metrics.ConfusionCounts(0, 0, 0, 0)
    batches = data.iterate_batches(samples, batch_size)
    total_batches = -(-len(samples) // batch_size)
    for chunk, images, masks in tqdm(
        batches, total=total_batches, desc="evaluate", unit="batch", disable=not progress
    ):
        x = pad_batch(data.normalize(images, normalization.mean, normalization.std), batch_size)
        probs = np.asarray(probabilities_of(variables, jnp.asarray(x)))[: len(chunk)]
        counts = metrics.confusion_counts(probs > threshold, masks)
        totals = totals + metrics.counts_from_array(counts)
    return {
        **metrics.segmentation_metrics(totals),
        "images": len(samples),
        "confusion": totals._asdict(),
    }
