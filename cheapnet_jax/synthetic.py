"""DAGM-like synthetic images: a textured background with elliptic defects and weak ellipse labels.

A first, small generator (smoothed-noise textures, one intensity-shifted ellipse per defective
image) that writes folders in the DAGM layout, so that `evaluate.py` runs with nothing
downloaded. Deterministic by seed; any size that is a multiple of 16.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cheapnet_jax.data import LABELS_FILE, check_image_size


def make_sample(
    rng: np.random.Generator, size: int, defective: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [size, size], mask bool [size, size])`` of one synthetic sample."""
    check_image_size("synthetic image", (size, size))
    sigma = rng.uniform(1.0, 4.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    texture = texture / (texture.std() + 1e-12)
    image = 110.0 + 25.0 * texture
    mask = np.zeros((size, size), bool)
    if defective:
        rows, cols = np.mgrid[:size, :size]
        center = rng.uniform(0.2 * size, 0.8 * size, 2)
        axes = rng.uniform(0.04 * size, 0.15 * size, 2)
        angle = rng.uniform(0, np.pi)
        dy, dx = rows - center[0], cols - center[1]
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0
        # The defect is a darker, smoother patch that fills most of its (weak) ellipse label.
        core = (u / (0.8 * axes[0])) ** 2 + (v / (0.8 * axes[1])) ** 2 <= 1.0
        image = np.where(core, image - 45.0 + 8.0 * texture, image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def write_dagm_folder(
    folder: str | os.PathLike, count: int = 8, size: int = 128, seed: int = 0, class_id: int = 0
) -> Path:
    """Write the ``count`` images of the test split in the DAGM layout; returns the folder."""
    folder = Path(folder)
    (folder / "Label").mkdir(parents=True, exist_ok=True)
    images, masks = make_split("test", count, size, seed)
    rows = [str(class_id)]
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        name = f"{index + 1:04d}"
        Image.fromarray(image).save(folder / f"{name}.PNG")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "Label" / f"{name}_label.PNG")
        rows.append(f"{index + 1}\t1\t{name}.PNG\t0\t{name}_label.PNG")
    (folder / LABELS_FILE).write_text("\n".join(rows) + "\n")
    return folder


SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def make_split(
    split: str, count: int, size: int = 512, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [count, size, size], masks bool [count, size, size])`` of one split.

    Splits draw from disjoint seeds, so train, validation and test never share an image.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    pairs = [make_sample(rng, size, defective=True) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
