"""Connected components on the device: labels, boxes and areas of defects.

`union_find_labels` is the parallel form of the two-pass algorithm, laid out for accelerators
(after the block-based GPU labelers: Allegretti et al., IEEE TPDS 2020):

- nodes are blocks of pixels that are always connected when set (2x2 for 8-connectivity, 1x2
  for 4-connectivity): 4x (2x) fewer nodes than pixels, edges computed from the block's pixels;
- runs of touching blocks along a row are merged first, for free, with a cumulative max;
- the edges to the row above are resolved by rounds of a fixed number of pointer jumps and a
  scatter-min that hooks a root onto the smaller root. Edges that are not real or whose trees
  already agree are sent out of range and dropped: no entry is a hot spot;
- the whole batch is one graph with one `while_loop` (the only data-dependent loop in a call),
  which stops after a round that changes nothing.

Every hook points to a smaller block index, so each component is rooted at its first block;
components are then numbered by their first pixel in raster order, exactly as
`scipy.ndimage.label` numbers them. `component_stats` reduces boxes and areas per horizontal
run (one update per run, none for background).

XLA:CPU runs scatters and gathers slowly, so ``method="auto"`` hands the masks to a C labeler on
the host through `jax.pure_callback` where the program is lowered for the CPU, and runs the
union-find where it is lowered for an accelerator (decided per lowering platform, so a program
exported from a CPU host for a GPU carries no host callback). The host labeler is OpenCV's
scan-based union-find (``CCL_SAUF``; boxes and areas reduced over the set pixels when they are
few, `SPARSE_BELOW`) where OpenCV is installed (``pip install cheapnet-jax[opencv]``, or any
OpenCV build), else `scipy.ndimage`. All give identical arrays (tested)."""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cheapnet_jax.platform import per_platform

Method = Literal["auto", "union_find", "scipy", "opencv"]


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 4:
        return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    if connectivity == 8:
        return np.ones((3, 3), bool)
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def opencv_available() -> bool:
    """Whether OpenCV (``cv2``) can be imported: ``method="auto"``'s CPU labeler then."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def _by_method(method: Method, host_forms: dict, device_form, *operands):
    """``host_forms``: ``{"scipy": ..., "opencv": ...}``, functions on the host callbacks."""
    has_opencv = opencv_available()
    if method == "opencv" and not has_opencv:
        raise ImportError(
            'method="opencv" needs OpenCV: pip install opencv-python-headless '
            "(or cheapnet-jax[opencv])"
        )
    forms = {"union_find": device_form, **host_forms}
    cpu = "opencv" if has_opencv else "scipy"
    return per_platform(method, forms, *operands, name="method", cpu=cpu, accelerator="union_find")


# Pointer jumps unrolled per round. Measured on 512x512 masks (benchmarks/labeling.py families):
# 1 jump needs up to 17 rounds on a spiral, 2 need 7-10 and were fastest overall on this CPU;
# 4 or more cost more per round than the rounds they save.
_JUMPS_PER_ROUND = 2


def _shift(array: jax.Array, d_row: int, d_col: int, fill) -> jax.Array:
    """``out[..., i, j] = array[..., i + d_row, j + d_col]``, ``fill`` outside."""
    height, width = array.shape[-2:]
    lead = [(0, 0)] * (array.ndim - 2)
    padded = jnp.pad(array, [*lead, (1, 1), (1, 1)], constant_values=fill)
    return padded[..., 1 + d_row : 1 + d_row + height, 1 + d_col : 1 + d_col + width]


def _running_max(array: jax.Array, axis: int = -1) -> jax.Array:
    """Cumulative maximum along ``axis``. `lax.cummax` lowers to a ``reduce_window`` that
    XLA:CPU runs in time quadratic in the row length (4x slower at 512); the associative scan
    is log2(length) elementwise passes on any platform."""
    return lax.associative_scan(jnp.maximum, array, axis=axis % array.ndim)


def _raster_cumsum(array: jax.Array) -> jax.Array:
    """Cumulative sum of ``[B, H, W]`` in raster order: scans along the rows, then the row
    totals' running offsets (a flat cumulative sum over H * W is 2x slower on XLA:CPU)."""
    along_rows = lax.associative_scan(jnp.add, array, axis=2)
    row_totals = along_rows[:, :, -1]
    offsets = jnp.cumsum(row_totals, axis=1) - row_totals
    return along_rows + offsets[:, :, None]


def _block_height(connectivity: int) -> int:
    """2 for 8-connectivity (2x2 blocks), 1 for 4-connectivity (1x2 blocks)."""
    return 2 if connectivity == 8 else 1


def _block_height_of(pixels: dict[tuple[int, int], jax.Array]) -> int:
    """The block height of `block_pixels`' output (its keys are the pixels' places)."""
    return 1 + max(r for r, _ in pixels)


def _foreground(pixels: dict[tuple[int, int], jax.Array]) -> jax.Array:
    """Whether each block holds a set pixel: ``[B, Hb, Wb]``."""
    return functools.reduce(jnp.logical_or, pixels.values())


def block_pixels(images: jax.Array, connectivity: int) -> dict[tuple[int, int], jax.Array]:
    """The pixels of every block of ``images [B, H, W]`` (masks, labels or values; padded with
    zeros to whole blocks), ``{(row, col) inside the block: [B, Hb, Wb]}``.

    Blocks are 2x2 for 8-connectivity and 1x2 for 4-connectivity: the largest blocks whose
    foreground pixels are always connected to each other, so a block can be one node.
    """
    block_height = _block_height(connectivity)
    batch, height, width = images.shape
    padded = jnp.pad(images, ((0, 0), (0, (-height) % block_height), (0, width % 2)))
    blocks = padded.reshape(
        batch, padded.shape[1] // block_height, block_height, padded.shape[2] // 2, 2
    )
    return {(r, c): blocks[:, :, r, :, c] for r in range(block_height) for c in range(2)}


def _block_edge(pixels: dict, d_row: int, d_col: int, connectivity: int) -> jax.Array:
    """Whether each block touches its neighbour at block offset (d_row, d_col)."""
    block_height = _block_height(connectivity)
    edge = None
    for (r, c), own in pixels.items():
        for (r2, c2), theirs in pixels.items():
            dy = d_row * block_height + r2 - r
            dx = d_col * 2 + c2 - c
            adjacent = max(abs(dy), abs(dx)) == 1 if connectivity == 8 else abs(dy) + abs(dx) == 1
            if adjacent:
                touch = own & _shift(theirs, d_row, d_col, False)
                edge = touch if edge is None else edge | touch
    return edge


def _initial_forest(
    pixels: dict[tuple[int, int], jax.Array], connectivity: int
) -> tuple[jax.Array, list[tuple[jax.Array, int, int]]]:
    """Parents ``[B, Hb, Wb]`` with runs merged, and the edges left: ``(touching [B, Hb, Wb],
    d_row, d_col)`` for every neighbour in the rows above and below.

    Two merges are free (cumulative maxima, no scatter): every block points at the first block
    of its run of touching blocks along its row, and the first blocks of runs that touch
    straight up, one under the other, point at the top of that vertical chain (the long
    vertical strokes that pointer jumping would otherwise take log2(length) jumps to flatten).
    """
    foreground = _foreground(pixels)
    batch, block_rows, block_cols = foreground.shape
    index = jnp.arange(batch * block_rows * block_cols, dtype=jnp.int32).reshape(foreground.shape)
    col = jnp.arange(block_cols, dtype=jnp.int32)
    row = jnp.arange(block_rows, dtype=jnp.int32)[:, None]
    left = _block_edge(pixels, 0, -1, connectivity)
    is_run_start = foreground & ~left
    run_start = _running_max(jnp.where(is_run_start, col, -1))
    up = _block_edge(pixels, -1, 0, connectivity)
    continues_chain = is_run_start & up & _shift(is_run_start, -1, 0, False)
    chain_top = _running_max(jnp.where(is_run_start & ~continues_chain, row, -1), axis=1)
    parent = jnp.where(
        is_run_start,
        index - (row - chain_top) * block_cols,
        jnp.where(foreground, index - col + run_start, index),
    )
    edges = []
    for d_row in (-1, 1):
        for d_col in (-1, 0, 1):
            touching = _block_edge(pixels, d_row, d_col, connectivity)
            if touching is not None:
                edges.append((touching, d_row, d_col))
    return parent, edges


def _hooks(parent: jax.Array, edges: list) -> tuple[jax.Array, jax.Array]:
    """One hooking step: ``(targets, values)`` for ``parent.at[targets].min(values)``.

    Every block offers its tree (its parent) the smallest tree among the neighbours it touches.
    Blocks with nothing smaller to offer, background included, and parents that are not roots
    (re-pointing an inner node would drop its own link; a later round hooks its root) get the
    out-of-range target ``parent.size``, so that the scatter drops them: no entry is a hot spot.
    """
    nodes = parent.size
    smallest = parent
    for touching, d_row, d_col in edges:
        theirs = _shift(parent, d_row, d_col, nodes)
        smallest = jnp.minimum(smallest, jnp.where(touching, theirs, nodes))
    flat = parent.reshape(-1)
    is_root = flat[flat] == flat
    targets = jnp.where((smallest.reshape(-1) < flat) & is_root, flat, nodes)
    return targets, smallest.reshape(-1)


def _resolve(parent: jax.Array, edges: list) -> tuple[jax.Array, jax.Array]:
    """Rounds of pointer jumps and hooks until one changes nothing: ``(roots, rounds)``.

    The one data-dependent loop of the labeler; the jumps inside a round are unrolled. A round
    that changes nothing leaves every block pointing at its root, the smallest block index of
    its component.
    """
    shape = parent.shape

    def round_(state):
        previous, _, rounds = state
        flat = previous.reshape(-1)
        for _ in range(_JUMPS_PER_ROUND):
            flat = flat[flat]
        targets, values = _hooks(flat.reshape(shape), edges)
        updated = flat.at[targets].min(values, mode="drop").reshape(shape)
        return updated, jnp.any(updated != previous), rounds + 1

    roots, _, rounds = lax.while_loop(
        lambda state: state[1], round_, (parent, jnp.array(True), jnp.array(0, jnp.int32))
    )
    return roots, rounds


def _number_components(
    pixels: dict[tuple[int, int], jax.Array], roots: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(label of every block [B, Hb, Wb], counts [B])`` in scipy's order.

    scipy numbers components by their first *pixel* in raster order, which lies in the root's
    block row but not always in the root block: each component takes the minimum over its
    blocks, then a cumulative sum over marks at those pixels numbers the components.
    """
    foreground = _foreground(pixels)
    batch, block_rows, block_cols = foreground.shape
    block_height = _block_height_of(pixels)
    padded_width = 2 * block_cols
    image_size = block_rows * block_height * padded_width
    block_row = jnp.arange(block_rows, dtype=jnp.int32)[:, None]
    col = jnp.arange(block_cols, dtype=jnp.int32)
    first_pixel = jnp.full(foreground.shape, image_size, jnp.int32)
    for r, c in sorted(pixels, reverse=True):
        position = (block_row * block_height + r) * padded_width + 2 * col + c
        first_pixel = jnp.where(pixels[r, c], position, first_pixel)
    nodes = roots.size
    flat_roots, flat_foreground = roots.reshape(-1), foreground.reshape(-1)
    component_first = (
        jnp.full((nodes,), image_size, jnp.int32)
        .at[jnp.where(flat_foreground, flat_roots, nodes)]
        .min(first_pixel.reshape(-1), mode="drop")
    )
    image_offset = jnp.repeat(
        jnp.arange(batch, dtype=jnp.int32) * image_size, block_rows * block_cols
    )
    is_root = flat_foreground & (flat_roots == jnp.arange(nodes, dtype=jnp.int32))
    marks = (
        jnp.zeros((batch * image_size,), jnp.int32)
        .at[jnp.where(is_root, image_offset + component_first, batch * image_size)]
        .set(1, mode="drop")
    )
    numbers = _raster_cumsum(marks.reshape(batch, block_rows * block_height, padded_width))
    numbers = numbers.reshape(batch, image_size)
    block_label = jnp.where(
        flat_foreground, numbers.reshape(-1)[image_offset + component_first[flat_roots]], 0
    )
    return block_label.reshape(foreground.shape), numbers[:, -1]


def _paint(pixels: dict[tuple[int, int], jax.Array], block_label: jax.Array) -> jax.Array:
    """Block labels back onto their set pixels: ``[B, Hb * block height, 2 * Wb]``."""
    batch, block_rows, block_cols = block_label.shape
    block_height = _block_height_of(pixels)
    rows = [
        jnp.stack([jnp.where(pixels[r, c], block_label, 0) for c in range(2)], axis=-1)
        for r in range(block_height)
    ]
    return jnp.stack(rows, axis=2).reshape(batch, block_rows * block_height, 2 * block_cols)


def _union_find_blocks(
    masks: jax.Array, connectivity: int
) -> tuple[dict[tuple[int, int], jax.Array], jax.Array, jax.Array, jax.Array]:
    """``(block pixels, block labels [B, Hb, Wb], counts [B], rounds)`` of masks [B, H, W]."""
    pixels = block_pixels(masks, connectivity)
    roots, rounds = _resolve(*_initial_forest(pixels, connectivity))
    block_label, counts = _number_components(pixels, roots)
    return pixels, block_label, counts, rounds


def _check_masks(masks: jax.Array, connectivity: int) -> jax.Array:
    _structure(connectivity)
    masks = jnp.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {masks.shape}")
    return masks


def union_find_labels(
    masks: jax.Array, connectivity: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pure-JAX union-find labeler: ``(labels [B, H, W], counts [B], rounds)``.

    ``rounds`` (a scalar: the batch is one graph) is the number of jump-and-hook rounds it took,
    the last of which only confirms that nothing changes.
    """
    masks = _check_masks(masks, connectivity)
    batch, height, width = masks.shape
    if batch * height * width == 0:
        return (
            jnp.zeros(masks.shape, jnp.int32),
            jnp.zeros((batch,), jnp.int32),
            jnp.array(0, jnp.int32),
        )
    pixels, block_label, counts, rounds = _union_find_blocks(masks, connectivity)
    return _paint(pixels, block_label)[:, :height, :width], counts, rounds


def _over_leading_axes(host_function):
    """``host_function`` of ``[B, H, W]`` arrays, applied to ``[..., H, W]``: under `jax.vmap`
    (``vmap_method="expand_dims"``) a callback receives the batch with one more leading axis per
    mapped level, and must answer with those axes too."""

    def wrapped(array: np.ndarray) -> tuple[np.ndarray, ...]:
        array = np.asarray(array)
        leading = array.shape[:-2]
        # The count, not -1: numpy cannot infer -1 for an array of size 0 (a 0x0 mask).
        outputs = host_function(array.reshape(math.prod(leading), *array.shape[-2:]))
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


SPARSE_BELOW = 1 / 8
"""The share of set pixels under which the OpenCV labeler measures boxes and areas over the set
pixels (`foreground_stats`) rather than with OpenCV's statistics, which visit every pixel
(about 0.7 ms per 512x512 mask): 0.4-0.66 ms against 1.0-1.3 per labeled mask at 5-10%, about
even at 20%, twice OpenCV's time at 50% (BENCHMARKS.md). Defect masks are mostly background."""


def _opencv_host(
    masks: np.ndarray, connectivity: int, max_components: int = 0
) -> tuple[np.ndarray, ...]:
    """OpenCV's labels, counts, stats ``[B, max_components, 5]`` and overflow of masks [B, H, W]
    (`opencv_labels`). Boxes and areas: see `SPARSE_BELOW`."""
    import cv2

    masks = np.ascontiguousarray(masks, bool)
    batch, height, width = masks.shape
    # K = 0 (labels only, `label_components`): no statistics either way.
    dense = max_components > 0 and np.count_nonzero(masks) >= SPARSE_BELOW * masks.size
    if not dense or height * width == 0:
        labels, counts = opencv_labels(masks, connectivity)
        stats = foreground_stats(set_pixels(masks, labels), batch, max_components)
    else:
        labels = np.zeros(masks.shape, np.int32)
        counts = np.zeros(batch, np.int32)
        stats = np.zeros((batch, max_components, 5), np.int32)
        for i, mask in enumerate(masks.view(np.uint8)):
            found, _, cv_stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
                mask, connectivity, cv2.CV_32S, cv2.CCL_SAUF, labels=labels[i]
            )
            kept = cv_stats[1 : max_components + 1]  # row 0 is the background
            left, top = kept[:, cv2.CC_STAT_LEFT], kept[:, cv2.CC_STAT_TOP]
            right = left + kept[:, cv2.CC_STAT_WIDTH] - 1
            bottom = top + kept[:, cv2.CC_STAT_HEIGHT] - 1
            area = kept[:, cv2.CC_STAT_AREA]
            stats[i, : len(kept)] = np.stack([left, top, right, bottom, area], -1)
            counts[i] = found - 1
    return labels, counts, stats, overflow_of(counts, max_components)


def overflow_of(counts: np.ndarray, max_components: int) -> np.ndarray:
    """Components beyond the first ``max_components`` per image, of their ``counts [B]``."""
    return np.maximum(counts - max_components, 0).astype(np.int32)


def opencv_labels(masks: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's labels ``int32 [B, H, W]`` and counts ``[B]`` of boolean masks ``[B, H, W]``,
    `label_components`'s on the CPU (numpy in, numpy out). Needs OpenCV.

    ``CCL_SAUF`` (Wu et al.'s scan-based union-find) numbers components by their first pixel
    in raster order, as `scipy.ndimage.label` does (OpenCV's default algorithm for 8-connectivity
    does not).
    """
    import cv2

    masks = np.ascontiguousarray(masks, bool)
    labels = np.zeros(masks.shape, np.int32)
    counts = np.zeros(masks.shape[0], np.int32)
    if masks.size == 0:  # OpenCV refuses empty images; they have no component
        return labels, counts
    for i, mask in enumerate(masks.view(np.uint8)):
        found, _ = cv2.connectedComponentsWithAlgorithm(
            mask, connectivity, cv2.CV_32S, cv2.CCL_SAUF, labels=labels[i]
        )
        counts[i] = found - 1
    return labels, counts


class SetPixels(NamedTuple):
    """The set pixels of masks ``[B, H, W]`` in raster order, image after image: each one's
    flat index, image, row, column and label."""

    index: np.ndarray
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    label: np.ndarray


def set_pixels(masks: np.ndarray, labels: np.ndarray) -> SetPixels:
    """The set pixels of boolean ``masks [B, H, W]`` and their ``labels``."""
    _, height, width = masks.shape
    index = np.flatnonzero(masks)  # of the bool masks: 7x faster than of the int32 labels
    image, pixel = np.divmod(index, height * width)
    row, col = np.divmod(pixel, width)
    return SetPixels(index, image, row, col, labels.reshape(-1)[index])


def foreground_stats(pixels: SetPixels, batch: int, max_components: int) -> np.ndarray:
    """``stats [B, K, 5]`` rows ``[x1, y1, x2, y2, area]`` of labels 1..K, from the set pixels
    only (a few percent of a defect mask): one bincount and four unbuffered min/max reductions
    over the whole batch; rows of absent labels are 0 (as are all for K = 0)."""
    segments = batch * max_components
    image, row, col, label = pixels.image, pixels.row, pixels.col, pixels.label
    kept = label <= max_components  # labels beyond K are counted as overflow only
    if not kept.all():
        image, row, col, label = image[kept], row[kept], col[kept], label[kept]
    segment = image * max_components + (label - 1)
    area = np.bincount(segment, minlength=segments)
    corners = []
    for reduce, start, values in (
        (np.minimum, np.iinfo(np.int64).max, col),
        (np.minimum, np.iinfo(np.int64).max, row),
        (np.maximum, -1, col),
        (np.maximum, -1, row),
    ):
        corner = np.full(segments, start, np.int64)
        reduce.at(corner, segment, values)
        corners.append(corner)
    stats = np.stack([*corners, area], axis=-1)
    stats[area == 0] = 0
    return stats.reshape(batch, max_components, 5).astype(np.int32)


def label_components(
    masks: jax.Array, connectivity: int = 8, *, method: Method = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Connected components of boolean masks ``[B, H, W]``.

    Returns ``(labels int32 [B, H, W], counts int32 [B])``: 0 is background, components are
    numbered 1..n in raster order of their first pixel (exactly `scipy.ndimage.label` with the
    matching structure). Works under jit and vmap, any H and W.
    """
    masks = _check_masks(masks, connectivity)

    def by_union_find(masks: jax.Array) -> tuple[jax.Array, jax.Array]:
        labels, counts, _ = union_find_labels(masks, connectivity)
        return labels, counts

    def on_host(host_labeler):
        def by_callback(masks: jax.Array) -> tuple[jax.Array, jax.Array]:
            result_shape = (
                jax.ShapeDtypeStruct(masks.shape, jnp.int32),
                jax.ShapeDtypeStruct(masks.shape[:1], jnp.int32),
            )
            return jax.pure_callback(
                _over_leading_axes(lambda m: host_labeler(m, connectivity)[:2]),
                result_shape,
                masks,
                vmap_method="expand_dims",
            )

        return by_callback

    host_forms = {"scipy": on_host(_scipy_labels_host), "opencv": on_host(_opencv_host)}
    return _by_method(method, host_forms, by_union_find, masks)


class ComponentStats(NamedTuple):
    """Per component ``k`` (label k+1): ``stats [B, K, 5]`` rows ``[x1, y1, x2, y2, area]``
    (inclusive corners), ``valid [B, K]``, and ``overflow [B]``: how many components did not fit
    in ``K = max_components`` (0 when none were left out)."""

    stats: jax.Array
    valid: jax.Array
    overflow: jax.Array


def _host_stats(labels: np.ndarray, max_components: int) -> tuple[np.ndarray, ...]:
    """numpy/scipy twin of the device reductions: boxes from `scipy.ndimage.find_objects` and
    areas from `scipy.ndimage.histogram` (one pass in C each, labels above ``max_components``
    skipped)."""
    from scipy import ndimage

    batch = labels.shape[0]
    stats = np.zeros((batch, max_components, 5), np.int32)
    overflow = np.zeros(batch, np.int32)
    for i, label_image in enumerate(np.asarray(labels)):
        largest = int(label_image.max(initial=0))
        overflow[i] = max(largest - max_components, 0)
        boxes = ndimage.find_objects(label_image, max_label=max_components)
        found = [(k, box) for k, box in enumerate(boxes) if box is not None]
        if not found:
            continue
        ids = [k for k, _ in found]
        stats[i, ids, :4] = [(c.start, r.start, c.stop - 1, r.stop - 1) for _, (r, c) in found]
        # Bins of width 1 centred on the labels 1..K; labels outside them are not counted.
        area = ndimage.histogram(label_image, 0.5, max_components + 0.5, max_components)
        stats[i, ids, 4] = area[ids]
    return stats, stats[..., 4] > 0, overflow


def component_stats(
    labels: jax.Array, max_components: int, *, method: Method = "auto"
) -> ComponentStats:
    """Boxes and areas of labels 1..max_components.

    ``method="union_find"`` (accelerators under ``"auto"``) computes them on the device with
    segment reductions; ``"scipy"`` and ``"opencv"`` (the CPU under ``"auto"``) with
    `scipy.ndimage` on the host through `jax.pure_callback` (XLA:CPU scatters are slow).
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {labels.shape}")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")

    def by_numpy(labels: jax.Array) -> ComponentStats:
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

    host_forms = {"scipy": by_numpy, "opencv": by_numpy}
    return _by_method(
        method, host_forms, lambda labels: _device_stats(labels, max_components), labels
    )


def _device_stats(labels: jax.Array, max_components: int) -> ComponentStats:
    """Boxes and areas reduced per horizontal run of one label (its last pixel carries the run's
    columns, row and length); every other pixel, background included, updates nothing."""
    height, width = labels.shape[1:]
    cols = jnp.arange(width, dtype=jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(height, dtype=jnp.int32)[:, None], (height, width))
    before = _shift(labels, 0, -1, 0)
    after = _shift(labels, 0, 1, 0)
    run_start = _running_max(jnp.where((labels > 0) & (labels != before), cols, -1))
    run_end = (labels > 0) & (labels != after) & (labels <= max_components)
    run_rows = jnp.broadcast_to(rows, labels.shape)
    run_end_col = jnp.broadcast_to(cols, labels.shape)
    stats, valid = _reduce_stats(
        jnp.where(run_end, labels, 0),
        max_components,
        (run_start, run_rows, run_end_col, run_rows, run_end_col - run_start + 1),
    )
    overflow = jnp.maximum(jnp.max(labels, axis=(1, 2), initial=0) - max_components, 0)
    return ComponentStats(stats, valid, overflow)


def component_segments(labels: jax.Array, max_components: int) -> jax.Array:
    """Flat scatter indices of ``labels [B, ...]``: ``b * K + label - 1`` for labels 1..K, and
    the out-of-range ``B * K`` (dropped by ``mode="drop"``) for background and labels beyond K,
    so that reductions over components update nothing for them."""
    batch = labels.shape[0]
    image = jnp.arange(batch, dtype=jnp.int32).reshape(-1, *[1] * (labels.ndim - 1))
    kept = (labels > 0) & (labels <= max_components)
    return jnp.where(kept, image * max_components + labels - 1, batch * max_components).reshape(-1)


def _reduce_stats(
    labels: jax.Array, max_components: int, pieces: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
    """``(stats [B, K, 5], valid [B, K])`` from pieces of components: for every entry of
    ``labels [B, ...]`` in 1..K, its ``x1, y1, x2, y2, area`` in ``pieces``; label 0 and labels
    beyond K go out of range and update nothing."""
    batch = labels.shape[0]
    segments = batch * max_components
    segment = component_segments(labels, max_components)
    x1, y1, x2, y2, area = pieces
    # One scatter-min carries the four corners (maxima as minima of negatives): XLA runs a
    # windowed scatter at about the cost of a scalar one.
    corners = jnp.stack([x1, y1, -x2, -y2], axis=-1).reshape(-1, 4)
    lowest = (
        jnp.full((segments, 4), np.iinfo(np.int32).max, jnp.int32)
        .at[segment]
        .min(corners, mode="drop")
        .reshape(batch, max_components, 4)
    )
    total = (
        jnp.zeros((segments,), jnp.int32)
        .at[segment]
        .add(area.reshape(-1), mode="drop")
        .reshape(batch, max_components)
    )
    valid = total > 0
    stats = jnp.stack(
        [lowest[..., 0], lowest[..., 1], -lowest[..., 2], -lowest[..., 3], total], axis=-1
    )
    return jnp.where(valid[..., None], stats, 0), valid


def _block_stats(
    pixels: dict[tuple[int, int], jax.Array],
    block_label: jax.Array,
    counts: jax.Array,
    max_components: int,
) -> ComponentStats:
    """Boxes and areas reduced per block: one update per foreground block, none for
    background."""
    block_height = _block_height_of(pixels)
    block_rows, block_cols = block_label.shape[1:]
    row = jnp.arange(block_rows, dtype=jnp.int32)[:, None] * block_height
    col = jnp.arange(block_cols, dtype=jnp.int32) * 2
    left = functools.reduce(jnp.logical_or, [p for (_, c), p in pixels.items() if c == 0])
    right = functools.reduce(jnp.logical_or, [p for (_, c), p in pixels.items() if c == 1])
    top = pixels[0, 0] | pixels[0, 1]
    bottom = pixels[block_height - 1, 0] | pixels[block_height - 1, 1]
    area = sum(p.astype(jnp.int32) for p in pixels.values())
    pieces = (
        col + jnp.where(left, 0, 1),
        row + jnp.where(top, 0, block_height - 1),
        col + jnp.where(right, 1, 0),
        row + jnp.where(bottom, block_height - 1, 0),
        area,
    )
    stats, valid = _reduce_stats(block_label, max_components, pieces)
    return ComponentStats(stats, valid, jnp.maximum(counts - max_components, 0))


def label_and_measure(
    masks: jax.Array,
    connectivity: int = 8,
    max_components: int = 256,
    *,
    method: Method = "auto",
) -> tuple[jax.Array, jax.Array, ComponentStats]:
    """`label_components` and `component_stats` in one: ``(labels, counts, stats)``.

    The union-find measures the components per block, before painting the labels.
    """
    masks = _check_masks(masks, connectivity)
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")

    def by_union_find(masks: jax.Array):
        batch, height, width = masks.shape
        if batch * height * width == 0:
            labels, counts = label_components(masks, connectivity, method="union_find")
            return labels, counts, component_stats(labels, max_components, method="union_find")
        pixels, block_label, counts, _ = _union_find_blocks(masks, connectivity)
        labels = _paint(pixels, block_label)[:, :height, :width]
        return labels, counts, _block_stats(pixels, block_label, counts, max_components)

    def on_host(host_measure):
        # One callback: the labels cross from the host once, not back again for their stats.
        def by_callback(masks: jax.Array):
            batch = masks.shape[0]
            result_shape = (
                jax.ShapeDtypeStruct(masks.shape, jnp.int32),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
                jax.ShapeDtypeStruct((batch, max_components, 5), jnp.int32),
                jax.ShapeDtypeStruct((batch, max_components), jnp.bool_),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
            )
            labels, counts, *stats = jax.pure_callback(
                _over_leading_axes(host_measure), result_shape, masks, vmap_method="expand_dims"
            )
            return labels, counts, ComponentStats(*stats)

        return by_callback

    def scipy_measure(masks: np.ndarray) -> tuple[np.ndarray, ...]:
        labels, counts = _scipy_labels_host(masks, connectivity)
        return labels, counts, *_host_stats(labels, max_components)

    def opencv_measure(masks: np.ndarray) -> tuple[np.ndarray, ...]:
        labels, counts, stats, overflow = _opencv_host(masks, connectivity, max_components)
        return labels, counts, stats, stats[..., 4] > 0, overflow

    host_forms = {"scipy": on_host(scipy_measure), "opencv": on_host(opencv_measure)}
    return _by_method(method, host_forms, by_union_find, masks)
