"""Evaluate CheapNet on a DAGM folder: segmentation metrics, parameters and GFLOPs."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cheapnet_jax import data, metrics
from cheapnet_jax.checkpoints import (
    AUTHORS_NORMALIZATION,
    LoadedModel,
    Normalization,
    load_checkpoint,
)
from cheapnet_jax.detection import Detections, make_detector
from cheapnet_jax.files import write_atomic
from cheapnet_jax.labeling import ComponentStats, component_stats, label_components
from cheapnet_jax.model import CheapNet, init_variables
from cheapnet_jax.synthetic import write_dagm_folder

PAPER_FLOPS_PER_G = 12_686_336
PAPER_FLOPS_CONSTANT = 1_048_576
PAPER_IMAGE_PIXELS = 512 * 512
# Activation budget used to pick a batch size: one [B, H, W, G] float32 map of about 256 MiB.
_ACTIVATION_BUDGET_BYTES = 256 * 2**20


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
    The count is of the reference (``lax`` convolution) form, whatever ``model.impl`` is: the
    fused CPU form computes the same arithmetic, but XLA also counts its padding and shifts.
    """
    reference = CheapNet(model.features, impl="lax")
    spec = jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32)
    lowered = jax.jit(lambda v, x: jax.nn.sigmoid(reference.apply(v, x))).lower(variables, spec)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / 1e9


def default_batch_size(features: int, height: int = 512, width: int = 512) -> int:
    """A batch size that keeps one activation map near 256 MiB (1 for G >= 256 at 512x512)."""
    per_image = features * height * width * 4
    return int(max(1, min(16, _ACTIVATION_BUDGET_BYTES // per_image)))


def compiled_batch_size(count: int, batch_size: int) -> int:
    """The batch a chunk of ``count`` images runs as: the smallest power of two >= count,
    at most ``batch_size``. A short last batch then costs about its own size instead of a
    full batch of blank images, with at most log2(batch_size) + 1 compiled shapes."""
    return min(batch_size, 1 << max(0, count - 1).bit_length())


def pad_batch(array: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad axis 0 to ``batch_size`` with zeros, so that batches share compiled shapes."""
    missing = batch_size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


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
    """

    counts: metrics.ConfusionCounts = field(
        default_factory=lambda: metrics.ConfusionCounts(0, 0, 0, 0)
    )
    paper_truth: list = field(default_factory=list)
    paper_found: list = field(default_factory=list)
    component_truth: list = field(default_factory=list)
    component_found: list = field(default_factory=list)
    left_out: int = 0

    def add(self, found: Detections, truth: ComponentStats, masks: np.ndarray) -> None:
        """Add a batch (numpy arrays, padding removed): detections, label components, labels."""
        self.counts = self.counts + metrics.counts_from_array(
            metrics.confusion_counts(found.masks, masks)
        )
        self.left_out += int(found.overflow.sum()) + int(truth.overflow.sum())
        for i, mask in enumerate(masks):
            truth_box = metrics.mask_bounding_box(mask)
            found_box = metrics.mask_bounding_box(found.masks[i])
            self.paper_truth.append([truth_box] if truth_box else [])
            self.paper_found.append([(found_box, 1.0)] if found_box else [])
            self.component_truth.append(_boxes(truth.stats[i], truth.valid[i]))
            boxes = _boxes(found.stats[i], found.valid[i])
            scores = found.scores[i][found.valid[i]]
            self.component_found.append(list(zip(boxes, scores, strict=True)))

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
        return {
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
    model: CheapNet,
    variables: Mapping,
    folder: str | os.PathLike,
    *,
    normalization: Normalization = AUTHORS_NORMALIZATION,
    threshold: float = 0.5,
    batch_size: int | None = None,
    max_components: int = 256,
    progress: bool = True,
) -> dict:
    """Segmentation and detection figures (see `Tally`) over every image of a DAGM folder.

    Segmentation: one confusion matrix summed over all images (prediction: p > threshold).
    """
    samples = data.list_dagm_samples(folder)
    if batch_size is None:
        batch_size = default_batch_size(model.features)
    detector = make_detector(model, threshold=threshold, max_components=max_components)
    truth_of = jax.jit(lambda masks: ground_truth_components(masks, max_components))
    tally = Tally()
    batches = data.iterate_batches(samples, batch_size)
    total_batches = -(-len(samples) // batch_size)
    evaluated, image_size = 0, None
    try:
        for chunk, images, masks in tqdm(
            batches, total=total_batches, desc="evaluate", unit="batch", disable=not progress
        ):
            n = len(chunk)
            padded = compiled_batch_size(n, batch_size)
            x = pad_batch(data.normalize(images, normalization.mean, normalization.std), padded)
            found = _first(detector(variables, jnp.asarray(x)), n)
            tally.add(found, _first(truth_of(pad_batch(masks, padded)), n), masks)
            evaluated, image_size = evaluated + n, list(images.shape[1:3])
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


@dataclass(frozen=True)
class EvaluationRequest:
    """What `evaluate.py` was asked to do (the parsed command line)."""

    checkpoint: str | None = None
    data_source: str = "synthetic"
    json_path: str | None = None
    features: int = 2
    mean: float | None = None  # None: the checkpoint's statistics, else the authors' Class 6
    std: float | None = None
    threshold: float = 0.5
    batch_size: int | None = None
    impl: str = "auto"
    image_size: int | None = None  # synthetic data: None = the training size, else 256
    progress: bool = True


def load_model(request: EvaluationRequest) -> LoadedModel:
    """The request's checkpoint (see `load_checkpoint`), or an untrained model without one."""
    if request.checkpoint is None:
        model = CheapNet(request.features, impl=request.impl)
        variables = init_variables(model, jax.random.key(0))
        return LoadedModel(model, variables, f"untrained CheapNet(G={request.features}), seed 0")
    return load_checkpoint(request.checkpoint, request.impl)


def resolve_normalization(request: EvaluationRequest, loaded: LoadedModel) -> Normalization:
    """Flags first, then the checkpoint's own statistics, then the authors' Class-6 values."""
    base = loaded.normalization or Normalization()
    return Normalization(
        base.mean if request.mean is None else request.mean,
        base.std if request.std is None else request.std,
    )


def format_table(figures: Mapping[str, object]) -> str:
    """The figures as an aligned two-column text table."""
    rows = [
        ("params", f"{figures['params']:,}"),
        ("GFLOPs (XLA, per image)", f"{figures['gflops']:.4f}"),
        ("GFLOPs (paper, thop)", f"{figures['gflops_paper']:.4f}"),
        ("images", str(figures["images"])),
        ("mIoU", f"{figures['miou']:.4f}"),
        ("IoU background", f"{figures['iou_background']:.4f}"),
        ("IoU defect", f"{figures['iou_defect']:.4f}"),
        ("mAcc", f"{figures['macc']:.4f}"),
        ("pixel accuracy", f"{figures['pixel_acc']:.4f}"),
        ("mAP (paper protocol)", f"{figures['map_paper']:.4f}"),
        ("AP50 (paper protocol)", f"{figures['ap50_paper']:.4f}"),
        ("mAP (components)", f"{figures['map_component']:.4f}"),
        ("AP50 (components)", f"{figures['ap50_component']:.4f}"),
        ("predicted components", str(figures["predicted_components"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_evaluation(request: EvaluationRequest) -> int:
    """Evaluate, print the table, write JSON if asked; returns the process exit status."""
    loaded = load_model(request)
    model, variables, source = loaded.model, loaded.variables, loaded.source
    normalization = resolve_normalization(request, loaded)
    with tempfile.TemporaryDirectory() as scratch:
        folder = request.data_source
        if folder == "synthetic":
            size = request.image_size or loaded.image_size or 256
            folder = write_dagm_folder(Path(scratch) / "synthetic", count=16, size=size)
        stopped = None
        try:
            results = evaluate_folder(
                model,
                variables,
                folder,
                normalization=normalization,
                threshold=request.threshold,
                batch_size=request.batch_size,
                progress=request.progress,
            )
        except EvaluationStopped as err:
            if err.partial is None:
                raise
            results, stopped = err.partial, str(err)
    height, width = results.pop("image_size")
    figures = {
        "checkpoint": source,
        "data": str(request.data_source),
        "features": model.features,
        "normalization": {"mean": normalization.mean, "std": normalization.std},
        "params": count_params(variables),
        "gflops": xla_gflops(model, variables, height, width),
        "gflops_paper": paper_gflops(model.features, height, width),
        "image_size": [height, width],
        **results,
    }
    if stopped:
        figures["incomplete"] = stopped
    print(f"CheapNet(G={model.features}) from {source} on {request.data_source}")
    print(format_table(figures))
    if request.json_path:
        Path(request.json_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(request.json_path, json.dumps(figures, indent=2) + "\n")
        print(f"wrote {request.json_path}")
    if stopped:
        print(f"error: {stopped}; the figures above cover those images only", file=sys.stderr)
        return 1
    return 0
