"""Connected components against scipy.ndimage (label, find_objects, sum) as the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from mask_shapes import shapes
from scipy import ndimage

from cheapnet_jax import labeling
from cheapnet_jax.labeling import (
    _hooks,
    _initial_forest,
    _opencv_host,
    _resolve,
    block_pixels,
    component_segments,
    component_stats,
    label_and_measure,
    label_components,
    union_find_labels,
)

STRUCTURES = {4: None, 8: np.ones((3, 3), bool)}


SHAPES = shapes()

_jitted_union_find = jax.jit(
    lambda masks, connectivity: label_components(masks, connectivity, method="union_find"),
    static_argnums=1,
)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv"])
def test_labels_equal_scipy(name, connectivity, method):
    mask = SHAPES[name]
    expected, expected_count = ndimage.label(mask, structure=STRUCTURES[connectivity])
    labels, counts = jax.jit(label_components, static_argnums=1, static_argnames="method")(
        mask[None], connectivity, method=method
    )
    np.testing.assert_array_equal(np.asarray(labels[0]), expected)
    assert int(counts[0]) == expected_count


def test_spiral_is_one_long_path():
    mask = SHAPES["spiral"]
    assert ndimage.label(mask)[1] == 1 and mask.sum() > 1500


def test_checkerboard_counts():
    checker = SHAPES["checkerboard"][None]
    assert int(_jitted_union_find(checker, 8)[1][0]) == 1
    assert int(_jitted_union_find(checker, 4)[1][0]) == 32 * 32 // 2


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv", "auto"])
def test_without_jit_and_under_vmap(method):
    """Every method, the CPU default's host callbacks included, under jit, vmap and nested vmap
    (each vmap level adds a leading axis to what a callback receives)."""
    chosen = [SHAPES["noise_0.4"], SHAPES["spiral"], SHAPES["comb"], SHAPES["checkerboard"]]
    masks = np.stack([np.pad(m, ((0, 64 - m.shape[0]), (0, 64 - m.shape[1]))) for m in chosen])
    expected = [ndimage.label(mask, structure=STRUCTURES[8]) for mask in masks]

    def label_then_measure(batch):  # [B, H, W] -> labels, counts, stats
        labels, counts = label_components(batch, 8, method=method)
        return labels, counts, component_stats(labels, 64, method=method).stats

    eager = label_then_measure(masks)
    vmapped = jax.jit(jax.vmap(lambda m: label_then_measure(m[None])))(masks)
    nested = jax.jit(jax.vmap(jax.vmap(lambda m: label_then_measure(m[None]))))(
        masks.reshape(2, 2, 64, 64)
    )
    for i, (labels, count) in enumerate(expected):
        boxes = ndimage.find_objects(labels)
        for found_labels, found_counts, found_stats in (
            (eager[0][i], eager[1][i], eager[2][i]),
            (vmapped[0][i, 0], vmapped[1][i, 0], vmapped[2][i, 0]),
            (nested[0][i // 2, i % 2, 0], nested[1][i // 2, i % 2, 0], nested[2][i // 2, i % 2, 0]),
        ):
            np.testing.assert_array_equal(np.asarray(found_labels), labels)
            assert int(found_counts) == count
            first = boxes[0]
            assert np.asarray(found_stats)[0, :4].tolist() == [
                first[1].start,
                first[0].start,
                first[1].stop - 1,
                first[0].stop - 1,
            ]


@pytest.mark.parametrize("name", ["spiral", "serpentine", "comb", "reverse_comb", "staircase"])
def test_adversarial_shapes_need_few_rounds(name):
    """Label propagation needs one sweep per pixel of the longest path (hundreds here); the
    union-find needs a handful of jump-and-hook rounds."""
    _, _, rounds = jax.jit(union_find_labels, static_argnums=1)(SHAPES[name][None], 8)
    assert int(rounds) <= 8


SMALL_SHAPES = [(1, 1), (1, 12), (12, 1), (2, 2), (5, 7), (7, 5), (12, 12)]


@settings(max_examples=60, deadline=None)
@given(
    mask=st.sampled_from(SMALL_SHAPES).flatmap(lambda shape: arrays(bool, shape)),
    connectivity=st.sampled_from([4, 8]),
)
def test_random_small_masks(mask, connectivity):
    """Random masks of a few shapes (one compiled program per shape; odd, even and one-wide
    shapes cover the padded blocks)."""
    expected, count = ndimage.label(mask, structure=STRUCTURES[connectivity])
    labels, counts = _jitted_union_find(mask[None], connectivity)
    np.testing.assert_array_equal(np.asarray(labels[0]), expected)
    assert int(counts[0]) == count
    labels, counts, _, _ = _opencv_host(mask[None], connectivity)  # the CPU default's host side
    np.testing.assert_array_equal(labels[0], expected)
    assert int(counts[0]) == count


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7])
def test_opencv_on_large_masks_numbers_and_measures_as_scipy(density, connectivity):
    """Masks large enough for OpenCV's multi-threaded labeling (stripes merged afterwards):
    numbering, boxes and areas still those of scipy, and the overflow past K counted."""
    masks = np.random.default_rng(int(density * 100)).random((2, 700, 1030)) < density
    labels, counts, (stats, valid, overflow) = jax.jit(
        lambda m: label_and_measure(m, connectivity, 300, method="opencv")
    )(masks)
    for i, mask in enumerate(masks):
        want, count = ndimage.label(mask, STRUCTURES[connectivity])
        np.testing.assert_array_equal(np.asarray(labels[i]), want)
        assert int(counts[i]) == count and int(overflow[i]) == max(count - 300, 0)
        kept = min(count, 300)
        boxes = ndimage.find_objects(want, max_label=kept)
        want_stats = [
            (b[1].start, b[0].start, b[1].stop - 1, b[0].stop - 1, a)
            for b, a in zip(boxes, np.bincount(want.ravel())[1 : kept + 1], strict=True)
        ]
        assert np.asarray(stats[i][:kept]).tolist() == [list(row) for row in want_stats]
        assert np.asarray(valid[i]).sum() == kept


@pytest.mark.parametrize("sparse_below", [0.0, 1.01], ids=["opencv_stats", "set_pixels"])
def test_opencv_host_measures_as_scipy_both_ways(sparse_below, monkeypatch):
    """The CPU default's host labeler, its boxes and areas taken either way (OpenCV's
    statistics, or reduced over the set pixels: `SPARSE_BELOW`), on one batch of masks from
    empty to dense, one with more components than K: scipy's labels, boxes, areas, overflow."""
    monkeypatch.setattr(labeling, "SPARSE_BELOW", sparse_below)
    rng = np.random.default_rng(7)
    masks = np.stack(
        [rng.random((97, 131)) < density for density in (0.0, 0.02, 0.1, 0.45, 0.8)]
        + [np.pad(SHAPES["comb"], ((0, 57), (0, 70)))]
    )
    max_components = 40
    labels, counts, stats, overflow = _opencv_host(masks, 8, max_components)
    for i, mask in enumerate(masks):
        want, count = ndimage.label(mask, STRUCTURES[8])
        np.testing.assert_array_equal(labels[i], want)
        assert counts[i] == count and overflow[i] == max(count - max_components, 0)
        kept = min(count, max_components)
        expected = np.zeros((max_components, 5), np.int64)
        areas = np.bincount(want.ravel(), minlength=kept + 1)[1 : kept + 1]
        for k, (rows, cols) in enumerate(ndimage.find_objects(want, max_label=kept)):
            expected[k] = [cols.start, rows.start, cols.stop - 1, rows.stop - 1, areas[k]]
        np.testing.assert_array_equal(stats[i], expected)
    assert overflow.max() > 0  # some mask had more components than K


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv"])
@pytest.mark.parametrize("name", ["noise_0.2", "comb", "border", "odd", "empty", "one_row"])
def test_component_stats_equal_find_objects(name, method):
    mask = SHAPES[name]
    labels, count = ndimage.label(mask, structure=STRUCTURES[8])
    stats, valid, overflow = jax.jit(
        lambda lab: component_stats(lab, max_components=1000, method=method)
    )(labels[None].astype(np.int32))
    assert int(valid[0].sum()) == count and int(overflow[0]) == 0
    areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        expected = [cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(areas[k])]
        assert stats[0, k].tolist() == expected


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv"])
def test_component_stats_reports_overflow(method):
    labels, count = ndimage.label(SHAPES["noise_0.05"])
    result = component_stats(labels[None].astype(np.int32), max_components=10, method=method)
    assert bool(result.valid[0].all()) and int(result.overflow[0]) == count - 10
    assert result.stats.shape == (1, 10, 5)
    expected = component_stats(labels[None].astype(np.int32), max_components=1000)
    np.testing.assert_array_equal(np.asarray(result.stats[0]), np.asarray(expected.stats[0, :10]))


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv", "auto"])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("name", ["noise_0.4", "checkerboard", "odd", "one_column", "empty"])
def test_label_and_measure_equals_scipy(name, connectivity, method):
    """Labels, counts, boxes and areas at once (the union-find measures per block), under jit
    and vmap."""
    mask = SHAPES[name]
    labels, count = ndimage.label(mask, structure=STRUCTURES[connectivity])
    areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    expected = np.zeros((2000, 5), np.int32)
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        expected[k] = [cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(areas[k])]

    def run(masks):
        return label_and_measure(masks, connectivity, 2000, method=method)

    for found_labels, found_counts, found_stats in (
        jax.jit(run)(mask[None]),
        jax.tree.map(lambda a: a[0], jax.jit(jax.vmap(run))(mask[None, None])),
    ):
        np.testing.assert_array_equal(np.asarray(found_labels[0]), labels)
        assert int(found_counts[0]) == count and int(found_stats.overflow[0]) == 0
        np.testing.assert_array_equal(np.asarray(found_stats.stats[0]), expected)
        assert int(found_stats.valid[0].sum()) == count


def test_label_and_measure_reports_overflow():
    labels, count = ndimage.label(SHAPES["noise_0.05"], np.ones((3, 3), bool))
    found = jax.jit(lambda m: label_and_measure(m, 8, 10, method="union_find")[2])(
        SHAPES["noise_0.05"][None]
    )
    assert count > 10 and int(found.overflow[0]) == count - 10 and bool(found.valid[0].all())
    first = ndimage.find_objects(labels)[0]
    assert found.stats[0, 0, :4].tolist() == [
        first[1].start,
        first[0].start,
        first[1].stop - 1,
        first[0].stop - 1,
    ]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_background_sends_no_update_to_an_in_range_index(connectivity):
    """The scatters of the union-find and of the statistics: an all-background mask (and a
    finished labeling, whose trees all agree) targets only the dropped index, never entry 0."""

    @functools.partial(jax.jit, static_argnums=1)
    def hook_targets(masks, finished):
        parent, edges = _initial_forest(block_pixels(masks, connectivity), connectivity)
        if finished:
            parent, _ = _resolve(parent, edges)
        return _hooks(parent, edges)[0], jnp.asarray(parent.size)

    for mask, finished in ((np.zeros((3, 32, 48), bool), False), (SHAPES["spiral"][None], True)):
        targets, nodes = hook_targets(mask, finished)
        assert np.all(np.asarray(targets) == nodes)
    empty = jnp.zeros((3, 32, 48), jnp.int32)
    assert np.all(np.asarray(component_segments(empty, 7)) == 3 * 7)
    segments = np.asarray(component_segments(jnp.asarray([[[0, 1, 9], [2, 0, 0]]]), 2))
    assert segments.tolist() == [2, 0, 2, 1, 2, 2]


# Borrowed edge cases: scikit-image's test_zero_size (label of 0xN / Nx0 arrays) and cc3d's
# test_empty and test_statistics_2d[0x1]. A zero-size mask has no component, as in scipy.
ZERO_SIZE = [(0, 0), (0, 1), (1, 0), (300, 0), (0, 300)]


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv", "auto"])
@pytest.mark.parametrize("shape", ZERO_SIZE, ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_size_masks_have_no_component_eagerly_jitted_and_vmapped(shape, method):
    masks = np.zeros((2, *shape), bool)
    want_labels, want_count = ndimage.label(masks[0], STRUCTURES[8])
    assert want_count == 0 and want_labels.shape == shape

    def measure(m):
        return label_and_measure(m, 8, 4, method=method)

    for form in (measure, jax.jit(measure)):
        labels, counts, (stats, valid, overflow) = form(jnp.asarray(masks))
        assert labels.shape == (2, *shape) and np.array_equal(counts, [0, 0])
        assert not np.any(valid) and np.array_equal(overflow, [0, 0])
        assert stats.shape == (2, 4, 5)
    labels, counts = jax.vmap(lambda m: label_components(m, method=method))(masks[:, None])
    assert labels.shape == (2, 1, *shape) and np.array_equal(counts, [[0], [0]])


@pytest.mark.parametrize("method", ["union_find", "scipy", "opencv"])
def test_an_empty_mask_of_any_size_has_no_component(method):
    @jax.jit
    def measure(masks):
        labels, counts = label_components(masks, method=method)
        return labels, counts, component_stats(labels, 3, method=method)

    for shape in [(1, 1), (1, 7), (7, 1), (33, 65)]:
        labels, counts, stats = measure(np.zeros((1, *shape), bool))
        assert int(counts[0]) == 0 and not np.any(labels)
        assert not np.any(stats.valid) and int(stats.overflow[0]) == 0


def test_without_opencv_auto_uses_scipy_and_opencv_method_says_what_to_install(monkeypatch):
    """The CPU default falls back to scipy where OpenCV is not installed (same answers)."""
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)  # import cv2 now fails
    masks = jnp.asarray(SHAPES["spiral"][None])
    labels, counts, (stats, valid, _) = label_and_measure(masks, 8, 8, method="auto")
    want, want_count = ndimage.label(SHAPES["spiral"], STRUCTURES[8])
    assert np.array_equal(labels[0], want) and int(counts[0]) == want_count
    boxes = ndimage.find_objects(want)
    assert [tuple(row[:4]) for row in np.asarray(stats[0][valid[0]])] == [
        (b[1].start, b[0].start, b[1].stop - 1, b[0].stop - 1) for b in boxes
    ]
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        label_components(masks, method="opencv")
