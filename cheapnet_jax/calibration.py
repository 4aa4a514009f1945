"""Threshold calibration: the pixel threshold and minimum defect area that give the image-level
verdicts a line wants, chosen on validation data with defect-free images among them.

An image is rejected (NG) at ``(threshold, min_area)`` when the mask ``probability > threshold``
has a component (8-connected) of at least ``min_area`` pixels, as in `predict.py`. So the only
thing an image contributes is its *largest component's area at each threshold* of a grid
(`THRESHOLDS`); every ``(threshold, min_area)`` pair is then scored at once. The choice:

- ``objective="f1"`` (default): the best image-level F1 of rejecting defective images;
- ``target_fpr=x``: the highest detection rate (TPR) with a false alarm rate <= x;
- ``target_tpr=y``: the lowest false alarm rate with a detection rate >= y;

ties broken by the lower false alarm rate, the higher detection rate, the smaller minimum area
and the threshold nearest 0.5, in that order. The result is stored with the model
(`checkpoints.calibration_path`) and `predict.py` uses it unless told otherwise.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from cheapnet_jax.errors import SettingsError
from cheapnet_jax.files import write_atomic

THRESHOLDS = np.round(np.arange(0.02, 0.981, 0.02), 2)
"""The pixel thresholds calibration chooses from: 0.02, 0.04, ..., 0.98."""


def largest_component_areas(probabilities: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """Area of the largest 8-connected component of ``probabilities > t`` for each threshold
    t: int ``[len(thresholds)]`` (0 where nothing exceeds t) of one map ``[H, W]``."""
    areas = np.zeros(len(thresholds), np.int64)
    for index, threshold in enumerate(thresholds):
        labels, count = ndimage.label(probabilities > threshold, np.ones((3, 3), bool))
        if count:
            areas[index] = np.bincount(labels.ravel())[1:].max()
    return areas


@dataclass
class CalibrationData:
    """Per image of a validation pass: its largest component's area at each threshold and
    whether it is defective."""

    largest: list = field(default_factory=list)
    defective: list = field(default_factory=list)

    def add(self, probabilities: np.ndarray, masks: np.ndarray) -> None:
        """A batch: probabilities float ``[B, H, W]`` and label masks ``[B, H, W]``."""
        for image_probabilities, mask in zip(probabilities, masks, strict=True):
            self.largest.append(largest_component_areas(image_probabilities))
            self.defective.append(bool(mask.any()))


def operating_points(largest: np.ndarray, defective: np.ndarray) -> dict[str, np.ndarray]:
    """Every ``(threshold, min_area)`` worth trying, flat arrays: ``threshold``, ``min_area``,
    ``tp``, ``fp``, ``fn``, ``tn``, ``tpr``, ``fpr``, ``precision``, ``f1``.

    ``largest``: int ``[N, T]`` (`largest_component_areas` per image); the minimum areas tried
    per threshold are 1 and every largest area seen, plus one above them all (rejects none):
    between two of those, no verdict changes.
    """
    defective = np.asarray(defective, bool)
    min_areas = np.unique(np.concatenate([[1], largest.ravel()[largest.ravel() > 0]]))
    min_areas = np.append(min_areas, min_areas.max() + 1)
    # rejected[n, t, a]: image n has a component of >= min_areas[a] pixels at threshold t
    rejected = largest[:, :, None] >= min_areas[None, None, :]
    positive = defective[:, None, None]
    tp = np.sum(rejected & positive, axis=0)
    fp = np.sum(rejected & ~positive, axis=0)
    fn = np.sum(~rejected & positive, axis=0)
    tn = np.sum(~rejected & ~positive, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / (tp + fn)
        fpr = fp / (fp + tn)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    grid_threshold, grid_area = np.meshgrid(THRESHOLDS, min_areas, indexing="ij")
    points = {
        "threshold": grid_threshold,
        "min_area": grid_area,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "tpr": tpr,
        "fpr": fpr,
        "precision": precision,
        "f1": f1,
    }
    return {name: values.ravel() for name, values in points.items()}


def choose(
    points: dict[str, np.ndarray],
    target_fpr: float | None = None,
    target_tpr: float | None = None,
) -> int:
    """Index of the chosen operating point (see the module docstring)."""
    if target_fpr is not None and target_tpr is not None:
        raise SettingsError("give --target-fpr or --target-tpr, not both")
    allowed = np.ones(points["tpr"].shape, bool)
    if target_fpr is not None:
        allowed = points["fpr"] <= target_fpr
        primary = -points["tpr"]
    elif target_tpr is not None:
        allowed = points["tpr"] >= target_tpr
        primary = points["fpr"]
    else:
        primary = -points["f1"]
    if not allowed.any():
        raise SettingsError(
            f"no threshold reaches a detection rate of {target_tpr} on this data (at most "
            f"{points['tpr'].max():.4f}): lower --target-tpr"
        )
    keys = (
        np.abs(points["threshold"] - 0.5),
        points["min_area"],
        -points["tpr"],
        points["fpr"],
        primary,
    )  # np.lexsort sorts by the last key first
    order = np.lexsort(keys)
    return int(order[allowed[order]][0])


def calibrate(
    data: CalibrationData,
    target_fpr: float | None = None,
    target_tpr: float | None = None,
) -> dict:
    """The calibration of a validation pass: the chosen threshold and minimum area, its
    figures, and the ROC/PR curve over thresholds at that minimum area. SettingsError when the
    data has no defect-free or no defective image (FPR or TPR would be undefined)."""
    defective = np.asarray(data.defective, bool)
    if defective.all():
        raise SettingsError(
            "calibration needs defect-free images: without them the false alarm rate is "
            "undefined (this data has only defective images)"
        )
    if not defective.any():
        raise SettingsError("calibration needs defective images: this data has none")
    largest = np.stack(data.largest)
    points = operating_points(largest, defective)
    chosen = choose(points, target_fpr, target_tpr)
    at_area = points["min_area"] == points["min_area"][chosen]
    curve = [
        {name: _plain(points[name][i]) for name in ("threshold", "tpr", "fpr", "precision")}
        for i in np.nonzero(at_area)[0]
    ]
    objective = (
        f"fpr <= {target_fpr}"
        if target_fpr is not None
        else f"tpr >= {target_tpr}"
        if target_tpr is not None
        else "best f1"
    )
    return {
        "threshold": _plain(points["threshold"][chosen]),
        "min_area": _plain(points["min_area"][chosen]),
        "objective": objective,
        **{
            name: _plain(points[name][chosen])
            for name in ("tpr", "fpr", "precision", "f1", "tp", "fp", "fn", "tn")
        },
        "images": {"defective": int(defective.sum()), "good": int((~defective).sum())},
        "curve": curve,
    }


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return round(value, 6) if isinstance(value, float) else value


def write_calibration(path: Path, calibration: dict, **provenance) -> list[Path]:
    """Write the calibration JSON (with ``provenance``: checkpoint, data, date) and its ROC and
    PR plots beside it (``<stem>-roc.png``, ``<stem>-pr.png``); returns the files written."""
    record = {**calibration, **provenance, "created": datetime.datetime.now().isoformat()}
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = _plot_curves(path, calibration)
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return [path, *plots]


def read_calibration(path: Path) -> dict | None:
    """The calibration stored at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        calibration = {"threshold": float(record["threshold"]), "min_area": int(record["min_area"])}
    except (ValueError, KeyError, TypeError) as err:
        raise SettingsError(
            f"{path}: not a calibration ({type(err).__name__}: {err}); run evaluate.py "
            "--calibrate again, or predict.py --no-calibration"
        ) from err
    if not 0 < calibration["threshold"] < 1 or calibration["min_area"] < 0:
        raise SettingsError(f"{path}: threshold or min_area out of range: {calibration}")
    return calibration


@dataclass(frozen=True)
class Setting:
    """A detection setting's value and where it came from: ``"given"`` (a flag or a request),
    ``"calibration"`` (the checkpoint's calibration file) or ``"default"``."""

    value: float | int
    origin: str


def resolve_settings(
    given: Mapping[str, float | int | None],
    defaults: Mapping[str, float | int],
    calibration_file: Path | None,
) -> dict[str, Setting]:
    """``threshold`` and ``min_area``: each as given when not None, else from the calibration
    at ``calibration_file`` (None: ignore any calibration), else the default. One rule for
    predict.py, the export and the inspection service."""
    calibration = read_calibration(calibration_file) if calibration_file is not None else None
    settings = {}
    for name in ("threshold", "min_area"):
        if given.get(name) is not None:
            settings[name] = Setting(given[name], "given")
        elif calibration is not None:
            settings[name] = Setting(calibration[name], "calibration")
        else:
            settings[name] = Setting(defaults[name], "default")
    return settings


def _plot_curves(path: Path, calibration: dict) -> list[Path]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = calibration["curve"]
    written = []
    for name, x_key, y_key, x_label, y_label in (
        ("roc", "fpr", "tpr", "false alarm rate (FPR)", "detection rate (TPR)"),
        ("pr", "tpr", "precision", "detection rate (recall)", "precision"),
    ):
        figure, axes = plt.subplots(figsize=(4.5, 4.5))
        axes.plot([p[x_key] for p in curve], [p[y_key] for p in curve], marker=".")
        axes.plot(calibration[x_key], calibration[y_key], "o", color="red", label="chosen")
        axes.set(xlabel=x_label, ylabel=y_label, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        axes.set_title(
            f"threshold {calibration['threshold']}, min area {calibration['min_area']}",
            fontsize=9,
        )
        axes.legend(loc="lower right")
        encoded = io.BytesIO()
        figure.savefig(encoded, format="png", dpi=100)
        plt.close(figure)
        target = path.with_name(f"{path.stem}-{name}.png")
        write_atomic(target, encoded.getvalue())
        written.append(target)
    return written
