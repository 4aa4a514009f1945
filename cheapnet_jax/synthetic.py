"""DAGM-like synthetic images: ten statistical texture families with elliptic defects.

DAGM 2007's ten classes are statistical textures (noise fields, gratings, blotches at several
scales) whose defects are patches of another texture or intensity, labelled by coarse
("weak") ellipses. This module draws images in that spirit so that training and evaluation
run with nothing downloaded:

- ten texture families (`FAMILIES`), each a zero-mean, unit-variance field of one kind, shown
  at a random brightness and contrast;
- a defective image carries one random ellipse; inside its core the surface is darker and
  has the texture of another family (a different texture *and* intensity, like most DAGM
  defects); the label is the whole ellipse, a little larger than the visible defect;
- deterministic by seed; any size that is a multiple of 16. Texture scales are in pixels (as
  in DAGM, where 512x512 images show the texture at its native scale); ellipse sizes are a
  fraction of the image.

`write_dagm_folder` (or ``cheapnet-synthetic --out DIR``) writes the test split in
the DAGM layout (`NNNN.PNG`, `Label/Labels.txt`, `Label/NNNN_label.PNG`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cheapnet_jax.data import LABELS_FILE, check_image_size

Texture = Callable[[np.random.Generator, int], np.ndarray]


def _standardized(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-12)


def _smoothed_noise(rng: np.random.Generator, size: int, sigma) -> np.ndarray:
    return _standardized(ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma))


def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[:size, :size].astype(np.float64)
    return rows, cols


def fine_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Fine-grained noise, correlation length about one pixel."""
    return _smoothed_noise(rng, size, rng.uniform(0.7, 1.5))


def blotches(rng: np.random.Generator, size: int) -> np.ndarray:
    """Large soft blotches over a faint grain."""
    return _standardized(
        _smoothed_noise(rng, size, rng.uniform(4.0, 8.0)) + 0.3 * _smoothed_noise(rng, size, 1.0)
    )


def multiscale_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Three octaves of noise, as in a cloudy fabric."""
    octaves = [_smoothed_noise(rng, size, sigma) for sigma in (1.0, 3.0, 9.0)]
    weights = rng.uniform(0.4, 1.0, 3)
    return _standardized(sum(w * o for w, o in zip(weights, octaves, strict=True)))


def grating(rng: np.random.Generator, size: int) -> np.ndarray:
    """A sinusoidal grating at a random angle and period, with grain."""
    rows, cols = _coordinates(size)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6.0, 14.0)
    phase = 2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period
    return _standardized(np.sin(phase + rng.uniform(0, 2 * np.pi)) + 0.4 * fine_noise(rng, size))


def weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two crossed gratings, like woven threads."""
    rows, cols = _coordinates(size)
    period = rng.uniform(8.0, 16.0)
    threads = np.sin(2 * np.pi * cols / period) * np.sin(2 * np.pi * rows / period)
    return _standardized(threads + 0.3 * fine_noise(rng, size))


def streaks(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise stretched along one axis: brushed metal."""
    along, across = rng.uniform(6.0, 12.0), rng.uniform(0.6, 1.2)
    sigma = (across, along) if rng.random() < 0.5 else (along, across)
    return _smoothed_noise(rng, size, sigma)


def spots(rng: np.random.Generator, size: int) -> np.ndarray:
    """Scattered soft dots on a calm background."""
    centres = rng.random((size, size)) < rng.uniform(0.01, 0.03)
    dots = ndimage.gaussian_filter(centres.astype(np.float64), rng.uniform(1.2, 2.0))
    return _standardized(_standardized(dots) + 0.3 * _smoothed_noise(rng, size, 2.0))


def rings(rng: np.random.Generator, size: int) -> np.ndarray:
    """Concentric rings around a centre that may lie outside the image: turned surfaces."""
    rows, cols = _coordinates(size)
    centre = rng.uniform(-0.5 * size, 1.5 * size, 2)
    radius = np.hypot(rows - centre[0], cols - centre[1])
    period = rng.uniform(6.0, 12.0)
    return _standardized(np.sin(2 * np.pi * radius / period) + 0.4 * fine_noise(rng, size))


def tiles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blocks of random brightness, softened: a cobbled or pressed surface."""
    cell = int(rng.integers(6, 14))
    cells = rng.standard_normal((size // cell + 2, size // cell + 2))
    blocks = np.kron(cells, np.ones((cell, cell)))[:size, :size]
    return _standardized(ndimage.gaussian_filter(blocks, 1.0) + 0.3 * fine_noise(rng, size))


def speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skewed (exponential) grain: a few bright specks on a dark field."""
    grains = rng.exponential(1.0, (size, size)) ** 2
    return _standardized(ndimage.gaussian_filter(grains, rng.uniform(0.6, 1.0)))


FAMILIES: dict[str, Texture] = {
    texture.__name__: texture
    for texture in (
        fine_noise,
        blotches,
        multiscale_noise,
        grating,
        weave,
        streaks,
        spots,
        rings,
        tiles,
        speckle,
    )
}


def _ellipse_coordinates(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): coordinates normalised by a random ellipse's axes; inside means u^2 + v^2 <= 1."""
    rows, cols = _coordinates(size)
    centre = rng.uniform(0.2 * size, 0.8 * size, 2)
    axes = rng.uniform(0.04 * size, 0.15 * size, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = rows - centre[0], cols - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / axes[0]
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / axes[1]
    return u, v


def make_sample(
    rng: np.random.Generator, size: int, defective: bool, family: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [size, size], mask bool [size, size])`` of one synthetic sample.

    ``family`` indexes `FAMILIES`; None draws one.
    """
    check_image_size("synthetic image", (size, size))
    names = list(FAMILIES)
    if family is None:
        family = int(rng.integers(len(names)))
    brightness, contrast = rng.uniform(90.0, 150.0), rng.uniform(15.0, 28.0)
    image = brightness + contrast * FAMILIES[names[family]](rng, size)
    mask = np.zeros((size, size), bool)
    if defective:
        u, v = _ellipse_coordinates(rng, size)
        radius2 = u**2 + v**2
        mask = radius2 <= 1.0
        # The visible defect fills most of its weak label: a darker patch of another family's
        # texture whose edge fades over a few pixels.
        other = (family + int(rng.integers(1, len(names)))) % len(names)
        defect = (
            brightness
            - rng.uniform(50.0, 80.0)
            + 0.4 * contrast * FAMILIES[names[other]](rng, size)
        )
        weight = np.clip((1.0 - radius2) / (1.0 - 0.8**2), 0.0, 1.0)
        image = (1.0 - weight) * image + weight * defect
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def write_dagm_folder(
    folder: str | os.PathLike,
    count: int = 8,
    size: int = 128,
    seed: int = 0,
    class_id: int = 0,
    defect_free: int = 0,
    split: str = "test",
) -> Path:
    """Write the ``count`` images of a split (default: test) in the DAGM layout; returns the
    folder.

    ``defect_free`` more images without a defect follow them, listed in ``Labels.txt`` with
    label ``0`` and no label file, as in DAGM.
    """
    folder = Path(folder)
    (folder / "Label").mkdir(parents=True, exist_ok=True)
    images, masks = make_split(split, count, size, seed, defect_free)
    rows = [str(class_id)]
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        name = f"{index + 1:04d}"
        Image.fromarray(image).save(folder / f"{name}.PNG")
        if index < count:
            label = folder / "Label" / f"{name}_label.PNG"
            Image.fromarray(mask.astype(np.uint8) * 255).save(label)
            rows.append(f"{index + 1}\t1\t{name}.PNG\t0\t{name}_label.PNG")
        else:
            rows.append(f"{index + 1}\t0\t{name}.PNG\t0\t0")
    (folder / LABELS_FILE).write_text("\n".join(rows) + "\n")
    return folder


WRITTEN_LAYOUTS = ("dagm", "plain", "coco", "cvat-mask")
"""The layouts `write_layout` writes (`cheapnet_jax.layouts` reads them and more)."""


def write_layout(
    folder: str | os.PathLike,
    layout: str,
    count: int = 8,
    size: int = 128,
    seed: int = 0,
    defect_free: int = 0,
    split: str = "test",
) -> Path:
    """Write a split's images (as `write_dagm_folder`) in one of `WRITTEN_LAYOUTS`, as the
    tools export them: plain (``images/``, ``masks/`` 0/255); coco (``images/`` and
    ``annotations.json``, each defect a compressed RLE of category ``defect``); cvat-mask
    (``JPEGImages/`` as PNG, ``SegmentationClass/`` colour masks, ``labelmap.txt``)."""
    if layout == "dagm":
        return write_dagm_folder(folder, count, size, seed, 0, defect_free, split)
    if layout not in WRITTEN_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(WRITTEN_LAYOUTS)}, got {layout!r}")
    folder = Path(folder)
    images, masks = make_split(split, count, size, seed, defect_free)
    names = [f"part{index + 1:04d}" for index in range(len(images))]
    image_folder = folder / ("JPEGImages" if layout == "cvat-mask" else "images")
    image_folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image).save(image_folder / f"{name}.png")
    defective = [(name, mask) for name, mask in zip(names, masks, strict=True) if mask.any()]
    if layout == "plain":
        (folder / "masks").mkdir(exist_ok=True)
        for name, mask in defective:
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")
    elif layout == "cvat-mask":
        (folder / "SegmentationClass").mkdir(exist_ok=True)
        (folder / "labelmap.txt").write_text(
            "# label:color_rgb:parts:actions\nbackground:0,0,0::\ndefect:250,50,83::\n"
        )
        for name, mask in zip(names, masks, strict=True):  # CVAT writes every image's mask
            colours = np.zeros((*mask.shape, 3), np.uint8)
            colours[mask] = (250, 50, 83)
            Image.fromarray(colours).save(folder / "SegmentationClass" / f"{name}.png")
    else:
        _write_coco(folder / "annotations.json", names, masks)
    return folder


def _write_coco(path: Path, names: list[str], masks: np.ndarray) -> None:
    from pycocotools import mask as coco_masks

    images, annotations = [], []
    for index, (name, mask) in enumerate(zip(names, masks, strict=True), start=1):
        height, width = mask.shape
        images.append({"id": index, "file_name": f"{name}.png", "height": height, "width": width})
        if mask.any():
            rle = coco_masks.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in coco_masks.toBbox(rle)],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    categories = [{"id": 1, "name": "defect"}]
    document = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(document))


def protocol_defect_free(count: int, protocol: str) -> int:
    """Good images a synthetic training split of ``count`` defective ones gains: half as many
    under the dagm protocol (DAGM's folders hold good images), none under the paper's."""
    return count // 2 if protocol == "dagm" else 0


def make_split(
    split: str, count: int, size: int = 512, seed: int = 0, defect_free: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, size, size], masks bool [N, size, size])`` of one split: ``count``
    defective images, then ``defect_free`` good ones (N = count + defect_free).

    Splits draw from disjoint seeds, so train, validation and test never share an image.
    Families take turns (image i has family i mod 10), so every split of ten or more images
    holds every family.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    pairs = [make_sample(rng, size, defective=True, family=i % len(FAMILIES)) for i in range(count)]
    # the good images: a stream no split's defective images use, one per split
    rng = np.random.default_rng([seed, len(SPLIT_SEEDS) + sorted(SPLIT_SEEDS).index(split)])
    pairs += [
        make_sample(rng, size, defective=False, family=i % len(FAMILIES))
        for i in range(count, count + defect_free)
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
