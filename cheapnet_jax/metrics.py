"""Segmentation metrics from confusion counts.

Counts are kept apart from their reduction: `confusion_counts` gives (tp, fp, fn, tn) for the
defect class, summed over a batch; they add up across batches and devices; `segmentation_metrics`
turns the totals into mIoU (mean IoU over background and defect), mAcc (mean per-class recall)
and pixel accuracy.
"""

from __future__ import annotations

import contextlib
import io
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


Box = tuple[int, int, int, int]
"""``(x1, y1, x2, y2)`` with inclusive corners, in pixels."""


def coco_xywh(box: Box) -> list[int]:
    """Inclusive corners -> COCO ``[x, y, w, h]`` with ``w = x2 - x1 + 1``."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return [x1, y1, x2 - x1 + 1, y2 - y1 + 1]


def mask_bounding_box(mask: np.ndarray) -> Box | None:
    """The box around every true pixel of a 2-d mask, or None when it has none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def coco_box_ap(
    ground_truth: list[list[Box]], detections: list[list[tuple[Box, float]]]
) -> dict[str, float]:
    """COCO bbox mAP (IoU .50:.95) and AP50 for one class, by pycocotools.

    ``ground_truth[i]`` are the boxes of image i; ``detections[i]`` its (box, score) pairs.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(detections):
        raise ValueError("ground_truth and detections must list the same images")
    images = [{"id": i + 1, "width": 1, "height": 1} for i in range(len(ground_truth))]
    annotations = []
    for image_id, boxes in enumerate(ground_truth, start=1):
        for box in boxes:
            xywh = coco_xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
    results = [
        {"image_id": image_id, "category_id": 1, "bbox": coco_xywh(box), "score": float(score)}
        for image_id, pairs in enumerate(detections, start=1)
        for box, score in pairs
    ]
    if not annotations:
        return {"map": float("nan"), "ap50": float("nan")}
    if not results:
        return {"map": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "ap50": float(evaluator.stats[1])}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``: the chance
    that a positive scores above a negative, ties counting half (Mann-Whitney U with average
    ranks; the value of scikit-learn's ``roc_auc_score``). None without both classes."""
    from scipy.stats import rankdata

    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if not n_positive or not n_negative:
        return None
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision: the sum over distinct score thresholds, high to low, of the recall
    gained times the precision there (scikit-learn's ``average_precision_score``, no
    interpolation). None without positives."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if not positive.any():
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_each_score = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    true_positives = np.cumsum(positive)[last_of_each_score]
    precision = true_positives / (last_of_each_score + 1)
    recall = true_positives / positive.sum()
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def image_level_metrics(
    scores: np.ndarray, defective: np.ndarray, rejected: np.ndarray
) -> dict[str, float | int | None]:
    """Image-level verdict figures, for an inspection line's question "good or bad?".

    ``scores``: one per image (higher: more likely defective); ``defective``: the truth;
    ``rejected``: the verdict at the settings in use (NG). Detection rate (TPR, recall of
    defective images), false alarm rate (FPR, share of good images rejected), the confusion
    counts of the verdicts, and the threshold-free AUROC and AP of the scores. A rate whose
    denominator is zero is None.
    """
    defective, rejected = np.asarray(defective, bool), np.asarray(rejected, bool)
    tp = int(np.sum(rejected & defective))
    fp = int(np.sum(rejected & ~defective))
    fn = int(np.sum(~rejected & defective))
    tn = int(np.sum(~rejected & ~defective))
    return {
        "images": int(defective.size),
        "defective_images": tp + fn,
        "good_images": fp + tn,
        "detection_rate": tp / (tp + fn) if tp + fn else None,
        "false_alarm_rate": fp / (fp + tn) if fp + tn else None,
        "auroc": roc_auc(scores, defective),
        "ap": average_precision(scores, defective),
        "verdicts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }
