"""Connected components against scipy.ndimage (label, find_objects, sum) as the reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from mask_shapes import shapes
from scipy import ndimage

from cheapnet_jax.labeling import component_stats, label_components, union_find_labels

STRUCTURES = {4: None, 8: np.ones((3, 3), bool)}


SHAPES = shapes()


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("method", ["union_find", "scipy"])
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
    assert int(label_components(checker, 8, method="union_find")[1][0]) == 1
    assert int(label_components(checker, 4, method="union_find")[1][0]) == 32 * 32 // 2


@pytest.mark.parametrize("method", ["union_find", "scipy", "auto"])
def test_without_jit_and_under_vmap(method):
    """Every method, the CPU default's host callbacks included, under jit, vmap and nested vmap
    (each vmap level adds a leading axis to what a callback receives)."""
    chosen = [SHAPES["noise_0.4"], SHAPES["spiral"], SHAPES["comb"], SHAPES["checkerboard"]]
    masks = np.stack([np.pad(m, ((0, 64 - m.shape[0]), (0, 64 - m.shape[1]))) for m in chosen])
    expected = [ndimage.label(mask, structure=STRUCTURES[8]) for mask in masks]

    def label_and_measure(batch):  # [B, H, W] -> labels, counts, stats
        labels, counts = label_components(batch, 8, method=method)
        return labels, counts, component_stats(labels, 64, method=method).stats

    eager = label_and_measure(masks)
    vmapped = jax.jit(jax.vmap(lambda m: label_and_measure(m[None])))(masks)
    nested = jax.vmap(jax.vmap(lambda m: label_and_measure(m[None])))(masks.reshape(2, 2, 64, 64))
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
    union-find needs a handful of hook-and-compress rounds."""
    _, _, iterations = union_find_labels(SHAPES[name][None], 8)
    assert int(iterations[0]) <= 8


@settings(max_examples=60, deadline=None)
@given(
    mask=arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))),
    connectivity=st.sampled_from([4, 8]),
)
def test_random_small_masks(mask, connectivity):
    expected, count = ndimage.label(mask, structure=STRUCTURES[connectivity])
    labels, counts = label_components(mask[None], connectivity, method="union_find")
    np.testing.assert_array_equal(np.asarray(labels[0]), expected)
    assert int(counts[0]) == count


@pytest.mark.parametrize("method", ["union_find", "scipy"])
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


@pytest.mark.parametrize("method", ["union_find", "scipy"])
def test_component_stats_reports_overflow(method):
    labels, count = ndimage.label(SHAPES["noise_0.05"])
    result = component_stats(labels[None].astype(np.int32), max_components=10, method=method)
    assert bool(result.valid[0].all()) and int(result.overflow[0]) == count - 10
    assert result.stats.shape == (1, 10, 5)
    expected = component_stats(labels[None].astype(np.int32), max_components=1000)
    np.testing.assert_array_equal(np.asarray(result.stats[0]), np.asarray(expected.stats[0, :10]))
