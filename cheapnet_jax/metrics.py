"""Segmentation metrics from confusion counts.

Counts are kept apart from their reduction: `confusion_counts` gives (tp, fp, fn, tn) for the
defect class, summed over a batch; they add up across batches and devices; `segmentation_metrics`
turns the totals into mIoU (mean IoU over background and defect), mAcc (mean per-class recall)
and pixel accuracy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class ConfusionCounts(NamedTuple):
    """Pixel counts for the defect class (background is the complement)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:  # type: ignore[override]
        return ConfusionCounts(*(int(a) + int(b) for a, b in zip(self, other, strict=True)))


def confusion_counts(predicted, target, valid=None) -> jnp.ndarray:
    """Counts ``[tp, fp, fn, tn]`` (int32) of boolean masks of the same shape.

    ``valid`` (broadcastable to the masks) excludes padded examples or pixels. Works on numpy
    and jax arrays, inside jit. int32 holds a batch of up to 8192 512x512 images: sum batches
    on the host with `counts_from_array` and ``+``.
    """
    predicted = jnp.asarray(predicted, bool)
    target = jnp.asarray(target, bool)
    weight = jnp.ones(predicted.shape, jnp.int32)
    if valid is not None:
        weight = weight * jnp.broadcast_to(jnp.asarray(valid, jnp.int32), predicted.shape)
    tp = jnp.sum(weight * (predicted & target))
    fp = jnp.sum(weight * (predicted & ~target))
    fn = jnp.sum(weight * (~predicted & target))
    tn = jnp.sum(weight * (~predicted & ~target))
    return jnp.stack([tp, fp, fn, tn])


def counts_from_array(array) -> ConfusionCounts:
    """`ConfusionCounts` (Python ints) from a ``[4]`` array of ``tp, fp, fn, tn``."""
    return ConfusionCounts(*(int(v) for v in np.asarray(array)))


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / denominator if denominator else float("nan")


def segmentation_metrics(counts: ConfusionCounts) -> dict[str, float]:
    """mIoU, per-class IoU, mAcc and pixel accuracy (NaN where a class never occurs)."""
    tp, fp, fn, tn = counts
    iou_defect = _ratio(tp, tp + fp + fn)
    iou_background = _ratio(tn, tn + fn + fp)
    recall_defect = _ratio(tp, tp + fn)
    recall_background = _ratio(tn, tn + fp)
    return {
        "miou": (iou_background + iou_defect) / 2,
        "iou_background": iou_background,
        "iou_defect": iou_defect,
        "macc": (recall_background + recall_defect) / 2,
        "pixel_acc": _ratio(tp + tn, tp + fp + fn + tn),
    }
