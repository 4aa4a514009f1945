"""A data folder checked before training: what it holds, what is wrong (errors), what may be
(warnings), one line each.

Errors: a folder of no layout or of two, a listed file missing, an image or mask that cannot be
decoded or is 16-bit, a mask whose size differs from its image's, a mask without an image.
Warnings: how the masks' values are read (0/255, 0/1, a palette, colours, other values), the
same image in the training and the validation split (equal pixels), no good or no defective
images, colour images converted to grayscale. `train.py` runs the check first and refuses to
train on errors; ``cheapnet-data check`` prints it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cheapnet_jax import data, layouts
from cheapnet_jax.data import DagmSample
from cheapnet_jax.errors import DataError


@dataclass
class Report:
    """What `check_folder` found. ``defect_fractions``: each defective image's share of defect
    pixels; ``conventions``: mask value conventions and how many masks follow each."""

    source: str
    description: str = ""
    images: int = 0
    defective: int = 0
    good: int = 0
    sizes: Counter = field(default_factory=Counter)
    defect_fractions: list[float] = field(default_factory=list)
    conventions: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """The report's lines: counts first, then each warning and error."""
        lines = [self.description] if self.description else []
        if self.images:
            lines.append(
                f"{self.images} images: {self.defective} defective, {self.good} good; "
                f"sizes {_sizes(self.sizes)}"
            )
        if self.defect_fractions:
            fractions = np.array(self.defect_fractions) * 100
            lines.append(
                f"defect pixels per defective image: mean {fractions.mean():.2f}%, "
                f"min {fractions.min():.3f}%, max {fractions.max():.2f}%"
            )
        lines += [f"warning: {line}" for line in self.warnings]
        lines += [f"error: {line}" for line in self.errors]
        return lines

    def as_json(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "images": self.images,
            "defective": self.defective,
            "good": self.good,
            "sizes": {f"{h}x{w}": n for (h, w), n in sorted(self.sizes.items())},
            "defect_fractions": self.defect_fractions,
            "mask_conventions": dict(self.conventions),
            "warnings": self.warnings,
            "errors": self.errors,
        }


def _sizes(sizes: Counter) -> str:
    if len(sizes) <= 3:
        return ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(sizes.items()))
    heights, widths = zip(*sizes, strict=True)
    return f"{len(sizes)} different, {min(heights)}-{max(heights)} x {min(widths)}-{max(widths)}"


CONVENTIONS = {
    "0/255": "0/255 masks: 255 is a defect",
    "0/1": "0/1 masks: 1 is a defect",
    "palette": "palette masks: index 0 is good, every other index a defect",
    "colour": "colour masks: black is good, every other colour a defect",
    "other": "masks with values other than 0/1 or 0/255: every non-zero value is a defect",
    "annotations": "masks drawn from the annotations",
    "label map": "colour masks read by their label map: the defect classes' colours are defects",
}


def mask_convention(path: Path) -> str:
    """How a mask file's values are read (a `CONVENTIONS` key); DataError if unreadable or of
    more than 8 bits."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in data.HIGH_BIT_DEPTH_MODES:
                raise DataError(f"{path}: 16-bit or wider mask (mode {mode!r}): save it as 8-bit")
            if mode == "P":
                return "palette"
            if mode not in ("L", "1"):
                return "colour"
            values = set(np.unique(np.asarray(image.convert("L"))).tolist())
    except OSError as err:
        raise DataError(f"{path}: cannot decode mask ({err})") from err
    if values <= {0, 255}:
        return "0/255"
    if values <= {0, 1}:
        return "0/1"
    return "other"


def _measure(sample: DagmSample) -> tuple[tuple[int, int], float, str | None, str, list[str]]:
    """One sample's (size, defect fraction, convention, pixel digest, warnings); DataError for
    anything that stops it being read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", data.ConvertedImageWarning)
        image, mask = data.read_sample(sample)
    notes = [str(w.message) for w in caught if issubclass(w.category, data.ConvertedImageWarning)]
    convention = None
    if sample.label_path is not None:
        if sample.label_path.suffix.lower() == ".json":
            convention = "annotations"
        elif getattr(sample.mask_of, "func", None) is layouts.colour_mask:
            convention = "label map"
        else:
            convention = mask_convention(sample.label_path)
    digest = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
    return image.shape[:2], float(mask.mean()), convention, digest, notes


def check_folder(
    source: str | os.PathLike,
    *,
    defect_classes: Sequence[str] = (),
    classes: Sequence[int] = (6,),
    protocol: str = "paper",
    seed: int = 0,
) -> Report:
    """Check every image and mask that training on ``source`` would read, split as training
    would split it (`layouts.training_splits`)."""
    report = Report(str(source))
    try:
        splits, report.description = layouts.training_splits(
            source, list(classes), protocol, seed, defect_classes
        )
    except DataError as err:
        report.errors.append(str(err))
        return report
    digests: dict[str, list[tuple[str, Path]]] = {}
    converted = 0
    for split, samples in splits.items():
        measured = data.threaded_map(_measure_or_error, samples, data.DECODE_THREADS)
        for sample, outcome in zip(samples, measured, strict=True):
            if isinstance(outcome, DataError):
                report.errors.append(str(outcome))
                continue
            size, fraction, convention, digest, notes = outcome
            converted += bool(notes)
            report.images += 1
            report.sizes[size] += 1
            if fraction > 0:
                report.defective += 1
                report.defect_fractions.append(fraction)
            else:
                report.good += 1
            if convention is not None:
                report.conventions[convention] += 1
            digests.setdefault(digest, []).append((split, sample.image_path))
    _add_warnings(report, digests, converted)
    return report


def _measure_or_error(sample: DagmSample):
    try:
        return _measure(sample)
    except DataError as err:
        return err


def _add_warnings(report: Report, digests: dict, converted: int) -> None:
    for convention, count in sorted(report.conventions.items()):
        report.warnings.append(f"{count} {CONVENTIONS[convention]}")
    if len(set(report.conventions) - {"annotations"}) > 1:
        report.warnings.append(
            "masks of several conventions in one folder: check that each marks what you mean"
        )
    for copies in digests.values():
        splits = {split for split, _ in copies}
        if len(splits) > 1:
            names = ", ".join(f"{path} ({split})" for split, path in copies)
            report.warnings.append(
                f"the same pixels in training and validation: {names}: the validation figures "
                "would flatter the model"
            )
    if report.images and not report.good:
        report.warnings.append(
            "no good images: image-level figures (FPR, AUROC) and calibration need some"
        )
    if report.images and not report.defective:
        report.warnings.append("no defective images: nothing to learn a defect from")
    if converted:
        report.warnings.append(f"{converted} colour images, read converted to grayscale")
