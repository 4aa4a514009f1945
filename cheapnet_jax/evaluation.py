"""Evaluate CheapNet on a DAGM folder: segmentation metrics, parameters and GFLOPs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm import tqdm

from cheapnet_jax import data, layouts, metrics, tfds_data
from cheapnet_jax.calibration import CalibrationData
from cheapnet_jax.inspection import Inspector, Result, compiled_batch_size, pad_batch
from cheapnet_jax.labeling import ComponentStats, component_stats, label_components
from cheapnet_jax.model import SIZE_MULTIPLE

# Activation budget used to pick a batch size: one [B, H, W, G] float32 map of about 256 MiB.
_ACTIVATION_BUDGET_BYTES = 256 * 2**20


def default_batch_size(features: int, height: int = 512, width: int = 512) -> int:
    """A batch size that keeps one activation map near 256 MiB (1 for G >= 256 at 512x512)."""
    per_image = features * height * width * 4
    return int(max(1, min(16, _ACTIVATION_BUDGET_BYTES // per_image)))


def _first(batch_tree, count: int):
    """The first ``count`` examples of every array of a batch, as numpy (drops the padding)."""
    return jax.tree.map(lambda array: np.asarray(array)[:count], batch_tree)


def _boxes(stats: np.ndarray, valid: np.ndarray) -> list[metrics.Box]:
    return [tuple(int(v) for v in row[:4]) for row in stats[valid]]


def ground_truth_components(masks: jax.Array, max_components: int) -> ComponentStats:
    """Boxes of the 8-connected components of label masks ``[B, H, W]``."""
    return component_stats(label_components(masks, 8)[0], max_components)


@dataclass
class Tally:
    """Running totals of an evaluation: confusion counts and the boxes of both mAP protocols.

    Detection (COCO bbox AP by pycocotools), two protocols: *paper*, one box per image around
    all predicted pixels with score 1.0 against the box around all label pixels; *component*,
    one box per 8-connected predicted component scored by its mean probability against one box
    per 8-connected label component.

    Image level (`metrics.image_level_metrics`), reported when the data holds defect-free
    images: an image's verdict is NG when it has a predicted defect, as in `predict.py`; its
    score is its maximum pixel probability (the choice of NVIDIA's DAGM UNet-Industrial), so
    that at the threshold in use, NG is exactly score > threshold. With images of several DAGM
    classes, the same figures per class too (``image_level_per_class``), like the published
    per-class DAGM tables.
    """

    counts: metrics.ConfusionCounts = field(
        default_factory=lambda: metrics.ConfusionCounts(0, 0, 0, 0)
    )
    paper_truth: list = field(default_factory=list)
    paper_found: list = field(default_factory=list)
    component_truth: list = field(default_factory=list)
    component_found: list = field(default_factory=list)
    left_out: int = 0
    image_scores: list = field(default_factory=list)
    image_defective: list = field(default_factory=list)
    image_rejected: list = field(default_factory=list)
    image_classes: list = field(default_factory=list)

    def add(
        self,
        results: list[Result],
        truth: ComponentStats,
        masks: np.ndarray,
        classes: list[int] | None = None,
    ) -> None:
        """Add a batch: the inspector's results (with masks and probabilities), the label
        components and labels (numpy, padding removed), and the images' DAGM classes (for the
        per-class image-level table)."""
        found_masks = np.stack([result.mask for result in results])
        self.counts = self.counts + metrics.counts_from_array(
            metrics.confusion_counts(found_masks, masks)
        )
        self.left_out += sum(r.components_left_out for r in results) + int(truth.overflow.sum())
        for i, (mask, result) in enumerate(zip(masks, results, strict=True)):
            truth_box = metrics.mask_bounding_box(mask)
            found_box = metrics.mask_bounding_box(result.mask)
            self.paper_truth.append([truth_box] if truth_box else [])
            self.paper_found.append([(found_box, 1.0)] if found_box else [])
            self.component_truth.append(_boxes(truth.stats[i], truth.valid[i]))
            self.component_found.append([(d.box, d.score) for d in result.defects])
            self.image_scores.append(float(result.probabilities.max()))
            self.image_defective.append(bool(mask.any()))
            self.image_rejected.append(bool(result.defects))
            self.image_classes.append(classes[i] if classes is not None else 0)

    def figures(self) -> dict:
        """Segmentation metrics, both mAPs and the number of predicted components."""
        if self.left_out:
            warnings.warn(
                f"{self.left_out} components did not fit in max_components and were left out "
                "of the component mAP: raise max_components",
                stacklevel=2,
            )
        paper = metrics.coco_box_ap(self.paper_truth, self.paper_found)
        component = metrics.coco_box_ap(self.component_truth, self.component_found)
        image_level = {}
        if not all(self.image_defective):
            image_level["image_level"] = metrics.image_level_metrics(
                np.array(self.image_scores), self.image_defective, self.image_rejected
            )
            classes = np.array(self.image_classes)
            if len(set(self.image_classes)) > 1:
                scores = np.array(self.image_scores)
                defective = np.array(self.image_defective)
                rejected = np.array(self.image_rejected)
                image_level["image_level_per_class"] = {
                    str(c): metrics.image_level_metrics(
                        scores[classes == c], defective[classes == c], rejected[classes == c]
                    )
                    for c in sorted(set(self.image_classes))
                }
        return {
            **image_level,
            **metrics.segmentation_metrics(self.counts),
            "map_paper": paper["map"],
            "ap50_paper": paper["ap50"],
            "map_component": component["map"],
            "ap50_component": component["ap50"],
            "predicted_components": sum(len(found) for found in self.component_found),
            "components_left_out": self.left_out,
            "confusion": self.counts._asdict(),
        }


def evaluate_folder(
    inspector: Inspector,
    folder: str | os.PathLike | list[data.DagmSample] | tfds_data.RecordSplit,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    calibration: CalibrationData | None = None,
    defect_classes: Sequence[str] = (),
) -> dict:
    """Segmentation and detection figures (see `Tally`) of ``inspector``'s answers (its
    threshold, min_area, normalisation and dtype: what predict.py answers) over every image
    of a data folder of any layout (`layouts.list_samples`, with its ``defect_classes``; images
    of any size), of a list of samples, or of a TFDS split (`tfds_data.RecordSplit`).

    Segmentation: one confusion matrix summed over all images. ``batch_size`` images are read
    at a time (default: the inspector's batch size). With ``calibration``, each image's
    probabilities are also measured for threshold calibration (`cheapnet_jax.calibration`).
    """
    if isinstance(folder, tfds_data.RecordSplit):
        samples = folder
    else:
        samples = (
            folder if isinstance(folder, list) else layouts.list_samples(folder, defect_classes)
        )
    batch_size = batch_size or inspector.options.batch_size
    max_components = inspector.options.max_components
    truth_of = jax.jit(lambda masks: ground_truth_components(masks, max_components))
    tally = Tally()
    if isinstance(samples, tfds_data.RecordSplit):
        batches = samples.batches(batch_size)
    else:
        batches = data.iterate_batches(samples, batch_size)
    total_batches = -(-len(samples) // batch_size)
    evaluated, image_size = 0, None
    try:
        for chunk, images, masks in tqdm(
            batches, total=total_batches, desc="evaluate", unit="batch", disable=not progress
        ):
            n = len(chunk)
            results = inspector.inspect(images, keep_masks=True, keep_probabilities=True)
            padded = compiled_batch_size(n, batch_size)
            truth = _first(truth_of(pad_batch(masks, padded)), n)
            tally.add(results, truth, masks, [sample.class_id for sample in chunk])
            if calibration is not None:
                calibration.add(np.stack([r.probabilities for r in results]), masks)
            # the size the network ran at (padded to a multiple of 16): for the GFLOPs
            image_size = [-(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE for side in images.shape[1:3]]
            evaluated += n
    except data.DataError as err:
        partial = (
            {**tally.figures(), "images": evaluated, "image_size": image_size}
            if evaluated
            else None
        )
        raise EvaluationStopped(
            f"{err} (stopped after {evaluated} of {len(samples)} images)", partial
        ) from err
    return {**tally.figures(), "images": evaluated, "image_size": image_size}


class EvaluationStopped(data.DataError):
    """Bad input stopped an evaluation; ``partial`` holds the figures of the images before it
    (None when there were none), so that what was computed is not lost."""

    def __init__(self, message: str, partial: dict | None):
        super().__init__(message)
        self.partial = partial
