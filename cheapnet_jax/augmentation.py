"""Augmentation on the device, inside the training step: flips, 90-degree rotations,
brightness, contrast, gamma (dm-pix's operations) and random crops.

Geometric operations move an image and its mask together (one array of two channels), so the
mask stays exactly the image's. Photometric ones act on the image alone, in pixel/255 units
(undoing the run's normalisation, then redoing it). Every draw comes from a key folded from the
run's seed, the step number and the device's index on the data-parallel axis: a run is
deterministic by its seed, resumes bit for bit (the step is in the train state), and each
device draws its own augmentations. The operations to apply are a flag per operation, so
members of a population may differ in them inside one compiled step; the crop size changes the
batch's shape and is one per program.
"""

from __future__ import annotations

from collections.abc import Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

AUGMENTATIONS = ("flip", "rot90", "brightness", "contrast", "gamma")
"""``--augment`` names (``crop`` is ``--crop-size``)."""
BRIGHTNESS_DELTA = 0.1
"""Largest brightness shift, in pixel/255 units."""
CONTRAST_RANGE = (0.8, 1.25)
"""Contrast factors drawn uniformly (dm-pix: about each image's mean)."""
GAMMA_RANGE = (0.8, 1.25)
"""Gamma exponents drawn uniformly (on pixel/255 values)."""


def augmentation_flags(names: Sequence[str]) -> np.ndarray:
    """``bool [len(AUGMENTATIONS)]``: which operations ``names`` turns on; ValueError naming an
    unknown one."""
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (one of {', '.join(AUGMENTATIONS)})")
    return np.array([name in names for name in AUGMENTATIONS])


def step_key(seed: jax.Array, step: jax.Array, axis_name: str | None) -> jax.Array:
    """The key of a step's draws on this device: the seed, then the step, then the device's
    index on ``axis_name`` (None: one device)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def _geometric(key, both: jax.Array, flags: jax.Array, crop_size: int) -> jax.Array:
    """Flips, a rotation and a crop of ``[H, W, C]`` (image and mask channels alike)."""
    left_right, up_down, turns, crop = jax.random.split(key, 4)
    flip = flags[0]
    both = jnp.where(flip & jax.random.bernoulli(left_right), pix.flip_left_right(both), both)
    both = jnp.where(flip & jax.random.bernoulli(up_down), pix.flip_up_down(both), both)
    height, width = both.shape[:2]
    # A quarter turn changes a non-square image's shape: only half turns there.
    quarter = height == width
    k = jax.random.randint(turns, (), 0, 4 if quarter else 2) * (1 if quarter else 2)
    k = jnp.where(flags[1], k, 0)
    both = jax.lax.switch(k, [lambda a, k=k: pix.rot90(a, k) for k in range(4)], both)
    if crop_size:
        rows, cols = jax.random.split(crop)
        top = jax.random.randint(rows, (), 0, height - crop_size + 1)
        left = jax.random.randint(cols, (), 0, width - crop_size + 1)
        both = jax.lax.dynamic_slice(both, (top, left, 0), (crop_size, crop_size, both.shape[2]))
    return both


def _photometric(key, image: jax.Array, flags: jax.Array, mean, std) -> jax.Array:
    """Brightness, contrast and gamma of a normalised ``[H, W, 1]`` image, in pixel/255 units."""
    brightness, contrast, gamma = jax.random.split(key, 3)
    values = image * std + mean
    delta = jax.random.uniform(brightness, (), image.dtype, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    values = jnp.where(flags[2], pix.adjust_brightness(values, delta), values)
    factor = jax.random.uniform(contrast, (), image.dtype, *CONTRAST_RANGE)
    values = jnp.where(flags[3], pix.adjust_contrast(values, factor), values)
    exponent = jax.random.uniform(gamma, (), image.dtype, *GAMMA_RANGE)
    values = jnp.where(flags[4], pix.adjust_gamma(jnp.clip(values, 0, 1), exponent), values)
    # Untouched when no photometric operation is on (the round trip is not exact).
    return jnp.where(flags[2:].any(), (jnp.clip(values, 0, 1) - mean) / std, image)


def augment_batch(
    key: jax.Array,
    x: jax.Array,
    masks: jax.Array,
    flags: jax.Array,
    mean,
    std,
    crop_size: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Augment a normalised batch ``x [B, H, W, 1]`` and its bool ``masks [B, H, W, 1]``: each
    image its own draws from ``key``; ``flags`` as `augmentation_flags`; ``crop_size`` (0:
    none) crops every image to ``crop_size`` x ``crop_size`` at a random place."""

    def one(key, image, mask):
        geometric, photometric = jax.random.split(key)
        both = jnp.concatenate([image, mask.astype(image.dtype)], axis=-1)
        both = _geometric(geometric, both, flags, crop_size)
        image, mask = both[..., :1], both[..., 1:] > 0.5
        return _photometric(photometric, image, flags, mean, std), mask

    return jax.vmap(one)(jax.random.split(key, x.shape[0]), x, masks)
