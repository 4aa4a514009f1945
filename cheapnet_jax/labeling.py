"""Connected components on the device: labels, boxes and areas of defects.

`label_components` is the parallel form of the two-pass algorithm: a union-find whose
equivalences are resolved by hooking roots onto the smaller root with a scatter-min and by
pointer jumping, rather than label propagation (which needs as many sweeps as the longest path
inside a component). Horizontal runs are merged first, for free, with a cumulative max: every
pixel starts pointing at the first pixel of its run. What is left are the edges to the row
above (and its diagonals for 8-connectivity).

Because every hook points to a smaller pixel index, each component ends up rooted at its first
pixel in raster order, so numbering the roots in raster order gives exactly the labels of
`scipy.ndimage.label`.

XLA:CPU runs scatters and gathers slowly, so on the CPU ``method="auto"`` hands the masks to
scipy's C labeler through `jax.pure_callback`, inside the same compiled program; accelerators
run the union-find; `component_stats` likewise measures boxes with numpy on the CPU and with
segment reductions on accelerators. Both paths give identical arrays (tested).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cheapnet_jax.platform import resolve_auto

Method = Literal["auto", "union_find", "scipy"]


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 4:
        return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    if connectivity == 8:
        return np.ones((3, 3), bool)
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _resolve_method(method: Method) -> Literal["union_find", "scipy"]:
    return resolve_auto(
        method,
        name="method",
        cpu="scipy",
        accelerator="union_find",
        options=("union_find", "scipy"),
    )


def _compress(parent: jax.Array) -> jax.Array:
    """Pointer jumping until every entry points at its root."""

    def not_done(state):
        return state[1]

    def jump(state):
        current, _ = state
        jumped = current[current]
        return jumped, jnp.any(jumped != current)

    return lax.while_loop(not_done, jump, (parent, jnp.array(True)))[0]


def _union_find_single(
    mask: jax.Array, connectivity: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One mask [H, W] -> (labels [H, W] int32, count, iterations)."""
    height, width = mask.shape
    size = height * width
    index = jnp.arange(size, dtype=jnp.int32).reshape(height, width)
    cols = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (height, width))

    # Runs: every foreground pixel points at the first pixel of its horizontal run.
    left = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    run_start_col = lax.cummax(jnp.where(mask & ~left, cols, -1), axis=1)
    parent = jnp.where(mask, index - cols + run_start_col, index).reshape(-1)

    # Edges to the row above: straight up, and the two diagonals for 8-connectivity.
    offsets = [(-1, 0)] if connectivity == 4 else [(-1, -1), (-1, 0), (-1, 1)]
    sources, targets = [], []
    padded = jnp.pad(mask, 1)
    padded_index = jnp.pad(index, 1)
    for d_row, d_col in offsets:
        window = (slice(1 + d_row, 1 + d_row + height), slice(1 + d_col, 1 + d_col + width))
        neighbour, neighbour_index = padded[window], padded_index[window]
        edge = mask & neighbour
        sources.append(jnp.where(edge, index, 0).reshape(-1))
        targets.append(jnp.where(edge, neighbour_index, 0).reshape(-1))
    sources = jnp.concatenate(sources)
    targets = jnp.concatenate(targets)

    def not_converged(state):
        return state[1]

    def hook(state):
        parent, _, iterations = state
        parent = _compress(parent)
        root_a, root_b = parent[sources], parent[targets]
        low, high = jnp.minimum(root_a, root_b), jnp.maximum(root_a, root_b)
        hooked = parent.at[high].min(low)
        return hooked, jnp.any(hooked != parent), iterations + 1

    parent, _, iterations = lax.while_loop(
        not_converged, hook, (parent, jnp.array(True), jnp.array(0, jnp.int32))
    )
    parent = _compress(parent)
    flat_mask = mask.reshape(-1)
    is_root = flat_mask & (parent == jnp.arange(size, dtype=jnp.int32))
    number = jnp.cumsum(is_root.astype(jnp.int32))
    labels = jnp.where(flat_mask, number[parent], 0).reshape(height, width)
    return labels, number[-1] if size else jnp.array(0, jnp.int32), iterations


def union_find_labels(
    masks: jax.Array, connectivity: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pure-JAX union-find labeler: ``(labels [B, H, W], counts [B], iterations [B])``.

    ``iterations`` is the number of hook-and-compress rounds each mask took.
    """
    _structure(connectivity)
    masks = jnp.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {masks.shape}")
    if masks.shape[1] * masks.shape[2] == 0:
        batch = masks.shape[0]
        return (
            jnp.zeros(masks.shape, jnp.int32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch,), jnp.int32),
        )
    return jax.vmap(lambda m: _union_find_single(m, connectivity))(masks)


def _over_leading_axes(host_function):
    """``host_function`` of ``[B, H, W]`` arrays, applied to ``[..., H, W]``: under `jax.vmap`
    (``vmap_method="expand_dims"``) a callback receives the batch with one more leading axis per
    mapped level, and must answer with those axes too."""

    def wrapped(array: np.ndarray) -> tuple[np.ndarray, ...]:
        array = np.asarray(array)
        leading = array.shape[:-2]
        outputs = host_function(array.reshape(-1, *array.shape[-2:]))
        return tuple(output.reshape(*leading, *output.shape[1:]) for output in outputs)

    return wrapped


def _scipy_labels_host(masks: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    structure = _structure(connectivity)
    labels = np.zeros(masks.shape, np.int32)
    counts = np.zeros(masks.shape[0], np.int32)
    for i, mask in enumerate(np.asarray(masks)):
        labels[i], counts[i] = ndimage.label(mask, structure=structure, output=np.int32)
    return labels, counts


def label_components(
    masks: jax.Array, connectivity: int = 8, *, method: Method = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Connected components of boolean masks ``[B, H, W]``.

    Returns ``(labels int32 [B, H, W], counts int32 [B])``: 0 is background, components are
    numbered 1..n in raster order of their first pixel (exactly `scipy.ndimage.label` with the
    matching structure). Works under jit and vmap, any H and W.
    """
    _structure(connectivity)
    masks = jnp.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {masks.shape}")
    if _resolve_method(method) == "union_find":
        labels, counts, _ = union_find_labels(masks, connectivity)
        return labels, counts
    result_shape = (
        jax.ShapeDtypeStruct(masks.shape, jnp.int32),
        jax.ShapeDtypeStruct(masks.shape[:1], jnp.int32),
    )
    return jax.pure_callback(
        _over_leading_axes(lambda m: _scipy_labels_host(m, connectivity)),
        result_shape,
        masks,
        vmap_method="expand_dims",
    )


class ComponentStats(NamedTuple):
    """Per component ``k`` (label k+1): ``stats [B, K, 5]`` rows ``[x1, y1, x2, y2, area]``
    (inclusive corners), ``valid [B, K]``, and ``overflow [B]``: how many components did not fit
    in ``K = max_components`` (0 when none were left out)."""

    stats: jax.Array
    valid: jax.Array
    overflow: jax.Array


def _host_stats(labels: np.ndarray, max_components: int) -> tuple[np.ndarray, ...]:
    """numpy twin of the device reductions: only foreground pixels are visited."""
    batch, _, width = labels.shape
    stats = np.zeros((batch, max_components, 5), np.int32)
    overflow = np.zeros(batch, np.int32)
    for i, label_image in enumerate(np.asarray(labels)):
        flat = label_image.reshape(-1)
        foreground = np.flatnonzero((flat > 0) & (flat <= max_components))
        ids = flat[foreground] - 1
        rows, cols = foreground // width, foreground % width
        low = np.full((2, max_components), np.iinfo(np.int32).max, np.int64)
        high = np.full((2, max_components), -1, np.int64)
        for axis, coordinate in enumerate((cols, rows)):
            np.minimum.at(low[axis], ids, coordinate)
            np.maximum.at(high[axis], ids, coordinate)
        area = np.bincount(ids, minlength=max_components)
        present = area > 0
        stats[i, present] = np.stack([low[0], low[1], high[0], high[1], area], axis=-1)[
            present
        ].astype(np.int32)
        overflow[i] = max(int(flat.max(initial=0)) - max_components, 0)
    return stats, stats[..., 4] > 0, overflow


def component_stats(
    labels: jax.Array, max_components: int, *, method: Method = "auto"
) -> ComponentStats:
    """Boxes and areas of labels 1..max_components.

    ``method="union_find"`` (accelerators under ``"auto"``) computes them on the device with
    segment reductions; ``"scipy"`` (the CPU under ``"auto"``) with numpy on the host through
    `jax.pure_callback`, visiting only foreground pixels (XLA:CPU scatters are slow).
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {labels.shape}")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    if _resolve_method(method) == "scipy":
        batch = labels.shape[0]
        result_shape = (
            jax.ShapeDtypeStruct((batch, max_components, 5), jnp.int32),
            jax.ShapeDtypeStruct((batch, max_components), jnp.bool_),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )
        return ComponentStats(
            *jax.pure_callback(
                _over_leading_axes(lambda lab: _host_stats(lab, max_components)),
                result_shape,
                labels,
                vmap_method="expand_dims",
            )
        )
    height, width = labels.shape[1:]
    rows = jnp.broadcast_to(jnp.arange(height, dtype=jnp.int32)[:, None], (height, width))
    cols = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (height, width))
    segments = max_components + 1  # segment 0 collects background and overflowing labels

    def single(label_image):
        ids = jnp.where(label_image > max_components, 0, label_image).reshape(-1)
        flat_rows, flat_cols = rows.reshape(-1), cols.reshape(-1)
        x1 = jax.ops.segment_min(flat_cols, ids, segments)
        y1 = jax.ops.segment_min(flat_rows, ids, segments)
        x2 = jax.ops.segment_max(flat_cols, ids, segments)
        y2 = jax.ops.segment_max(flat_rows, ids, segments)
        area = jax.ops.segment_sum(jnp.ones_like(ids), ids, segments)
        stats = jnp.stack([x1, y1, x2, y2, area], axis=-1)[1:]
        valid = area[1:] > 0
        overflow = jnp.maximum(jnp.max(label_image, initial=0) - max_components, 0)
        return jnp.where(valid[:, None], stats, 0), valid, overflow

    stats, valid, overflow = jax.vmap(single)(labels)
    return ComponentStats(stats, valid, overflow)
