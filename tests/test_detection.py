"""The detector against scipy.ndimage, and COCO mAP on cases whose answer is known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cheapnet_jax import CheapNet
from cheapnet_jax.detection import (
    component_sums,
    detect,
    detections_from_probabilities,
    detections_on_host,
    make_detector,
    make_network,
)
from cheapnet_jax.labeling import SPARSE_BELOW
from cheapnet_jax.metrics import coco_box_ap, coco_xywh, mask_bounding_box
from cheapnet_jax.model import init_variables


@pytest.mark.parametrize("method", ["union_find", "scipy"])
def test_components_scores_and_boxes_match_scipy(method):
    rng = np.random.default_rng(5)
    smooth = ndimage.gaussian_filter(rng.standard_normal((2, 48, 64)), (0, 2, 2))
    probabilities = 1 / (1 + np.exp(-8 * smooth))
    found = jax.jit(lambda p: detections_from_probabilities(p, max_components=64, method=method))(
        jnp.asarray(probabilities)
    )
    for i in range(2):
        labels, count = ndimage.label(probabilities[i] > 0.5, np.ones((3, 3)))
        assert count > 3 and int(found.valid[i].sum()) == count
        np.testing.assert_array_equal(np.asarray(found.labels[i]), labels)
        index = np.arange(1, count + 1)
        means = ndimage.mean(probabilities[i], labels, index)
        np.testing.assert_allclose(np.asarray(found.scores[i, :count]), means, rtol=1e-5)
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
            assert found.stats[i, k, :4].tolist() == [
                cols.start,
                rows.start,
                cols.stop - 1,
                rows.stop - 1,
            ]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", [(47, 63), (48, 64), (1, 9), (9, 1)])
def test_component_sums_are_scipys_sums_per_label(connectivity, shape):
    """Sums reduced per block (2x2, or 1x2 for 4-connectivity) against scipy's per-pixel
    `sum_labels`, odd sizes included; components beyond max_components are left out; eager,
    jitted and under vmap."""
    rng = np.random.default_rng(connectivity + shape[0])
    masks = rng.random((3, *shape)) < 0.45
    values = rng.random((3, *shape)).astype(np.float32)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels = np.stack([ndimage.label(m, structure)[0] for m in masks]).astype(np.int32)
    max_components = 5
    expected = np.zeros((3, max_components), np.float64)
    for i in range(3):
        count = min(int(labels[i].max()), max_components)
        index = np.arange(1, count + 1)
        expected[i, :count] = ndimage.sum_labels(values[i], labels[i], index)
    assert (labels.max(axis=(1, 2)) > max_components).any() or shape[0] == 1 or shape[1] == 1

    def sums(label_images, value_images):
        return component_sums(label_images, value_images, max_components, connectivity)

    per_image = jax.vmap(
        lambda label_image, value_image: sums(label_image[None], value_image[None])[0]
    )
    for found in (sums(labels, values), jax.jit(sums)(labels, values), per_image(labels, values)):
        np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-5, atol=1e-6)


def test_component_sums_refuse_other_connectivities():
    with pytest.raises(ValueError, match="connectivity"):
        component_sums(jnp.zeros((1, 4, 4), jnp.int32), jnp.zeros((1, 4, 4)), 2, connectivity=6)


def test_min_area_drops_specks():
    probabilities = np.zeros((1, 32, 32), np.float32)
    probabilities[0, 2, 2] = 0.9  # a 1-pixel speck
    probabilities[0, 10:14, 10:15] = 0.8  # a 20-pixel defect
    found = detections_from_probabilities(jnp.asarray(probabilities), min_area=5)
    kept = np.asarray(found.stats[0][np.asarray(found.valid[0])])
    assert kept.tolist() == [[10, 10, 14, 13, 20]]
    np.testing.assert_allclose(float(found.scores[0, 1]), 0.8, rtol=1e-6)


def test_detect_runs_the_network_in_one_program():
    model = CheapNet(2)
    variables = init_variables(model, jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 1)), jnp.float32)
    found = detect(model, variables, x, threshold=0.5, max_components=16)
    expected = jax.nn.sigmoid(jax.jit(model.apply)(variables, x))[..., 0]
    np.testing.assert_allclose(np.asarray(found.probabilities), np.asarray(expected), rtol=1e-6)
    assert found.stats.shape == (3, 16, 5) and found.labels.shape == (3, 32, 32)


@pytest.mark.parametrize("crop", [None, (45, 61)])
def test_detections_on_host_are_the_cpu_detectors_arrays(crop):
    """`detections_on_host` (numpy and OpenCV in the calling thread) against `make_detector` on
    the CPU (OpenCV in a callback, XLA's sums): every array equal, the scores to the bit, for
    masks sparse and dense (both ways of measuring, `SPARSE_BELOW`), components beyond
    max_components, min_area, odd crops."""
    pytest.importorskip("cv2", reason="detections_on_host needs OpenCV")
    model = CheapNet(2)
    variables = init_variables(model, jax.random.key(1))
    rng = np.random.default_rng(2)
    pixels = ndimage.gaussian_filter(rng.random((4, 48, 64)) * 255, (0, 1.5, 1.5))
    pixels = pixels.astype(np.uint8)
    normalization = (float(pixels.mean()), float(pixels.std()))
    probabilities = np.asarray(
        make_network(model, normalization=normalization)(variables, pixels, crop=crop)
    )
    for share_set, min_area in ((0.04, 0), (0.5, 5)):
        threshold = float(np.quantile(probabilities, 1 - share_set))
        detector = make_detector(
            model, threshold=threshold, min_area=min_area, max_components=8,
            normalization=normalization,
        )  # fmt: skip
        expected = jax.device_get(detector(variables, pixels, crop=crop))
        found = detections_on_host(
            probabilities, threshold=threshold, min_area=min_area, max_components=8
        )
        for field, array in zip(expected._fields, expected, strict=True):
            np.testing.assert_array_equal(getattr(found, field), array, err_msg=field)
        assert (expected.masks.mean() < SPARSE_BELOW) == (share_set < SPARSE_BELOW)
        assert expected.valid.any(axis=1).all()  # a defect in every image
        assert expected.scores[expected.valid].min() > threshold
    dropped = (expected.stats[..., 4] > 0) & ~expected.valid  # by min_area
    assert expected.overflow.max() > 0 and dropped.any()


def test_coco_box_conventions():
    assert coco_xywh((3, 4, 3, 9)) == [3, 4, 1, 6]
    mask = np.zeros((10, 12), bool)
    mask[2, 5] = mask[7, 1] = True
    assert mask_bounding_box(mask) == (1, 2, 5, 7)
    assert mask_bounding_box(np.zeros((4, 4), bool)) is None


def test_coco_ap_perfect_and_empty():
    truth = [[(0, 0, 9, 9)], [(5, 5, 20, 30), (40, 40, 41, 41)]]
    perfect = [[(box, 1.0) for box in boxes] for boxes in truth]
    assert coco_box_ap(truth, perfect) == pytest.approx({"map": 1.0, "ap50": 1.0})
    assert coco_box_ap(truth, [[], []]) == {"map": 0.0, "ap50": 0.0}


def test_coco_ap_known_iou():
    """A 16x16 box found as 16x13 (IoU 0.8125) counts at the IoU thresholds .50 .. .80, i.e.
    7 of the 10 thresholds: mAP 0.7, AP50 1."""
    result = coco_box_ap([[(0, 0, 15, 15)]], [[((0, 0, 15, 12), 0.9)]])
    assert result["map"] == pytest.approx(0.7) and result["ap50"] == pytest.approx(1.0)


def test_coco_ap_ranks_by_score():
    """Two images, one right and one wrong detection: the wrong one scored higher halves the
    precision: AP50 computed by hand with 101-point interpolation."""
    truth = [[(0, 0, 9, 9)], [(0, 0, 9, 9)]]
    found = [[((0, 0, 9, 9), 0.4)], [((50, 50, 59, 59), 0.9)]]
    # Ranked: a false positive (0.9), then a true positive (0.4): recall 0.5 at precision 0.5,
    # recall 1 never reached. Interpolated precision is 0.5 for recall 0..0.5, 0 above: 51/101.
    assert coco_box_ap(truth, found)["ap50"] == pytest.approx(0.5 * 51 / 101)
