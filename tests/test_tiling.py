"""Tiled inference equals whole-image inference: the receptive field against autodiff, the
probability maps, and the defects against scipy's labeling of the whole image's mask, seams
included; the line-scan API against the same, chunk by chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cheapnet_jax.data import pad_to_multiple
from cheapnet_jax.detection import make_detector, network_probabilities
from cheapnet_jax.model import CheapNet, init_variables, receptive_field_radius
from cheapnet_jax.tiling import (
    StripDetector,
    check_tile,
    detect_tiled,
    make_tile_detector,
    tile_margin,
)

NORMALIZATION = (0.5, 0.25)


def test_receptive_field_radius_is_the_extent_of_the_gradient():
    """Autodiff of the real network (float64, random weights): over the 16 phases of the
    stride-16 grid, the input pixels an output pixel depends on reach exactly the radius."""
    with jax.enable_x64(True):
        model = CheapNet(3, impl="lax")
        variables = init_variables(model, jax.random.PRNGKey(0))
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x = jax.random.normal(jax.random.PRNGKey(1), (1, 96, 96, 1), jnp.float64)
        positions = np.arange(48, 64)  # every phase modulo 16, away from the border

        @jax.jit
        @jax.vmap
        def support(position):
            def output(x):
                return model.apply(variables, x)[0, position, position, 0]

            return jax.grad(output)(x)[0, :, :, 0] != 0

        reach = []
        for position, depends in zip(positions, np.asarray(support(positions)), strict=True):
            rows, cols = np.nonzero(depends)
            reach += [np.abs(rows - position).max(), np.abs(cols - position).max()]
    assert max(reach) == receptive_field_radius() == 31
    assert min(reach) < 31  # the reach depends on the phase: the radius is its maximum
    assert tile_margin() == 32


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    noise = rng.integers(0, 256, (height, width)).astype(np.float64)
    return ndimage.uniform_filter(noise, 5).astype(np.uint8)


def _whole(model, variables, image):
    """Whole-image probabilities of the image padded as predict.py pads it, cropped back."""
    padded = pad_to_multiple(image)
    probabilities = network_probabilities(
        model, variables, jnp.asarray(padded[None]), normalization=NORMALIZATION
    )
    return np.asarray(probabilities)[0, : image.shape[0], : image.shape[1]]


def _scipy_defects(probabilities, threshold, connectivity=8):
    """Boxes, areas and mean probabilities of the components of the whole mask, by scipy."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    labels, _ = ndimage.label(probabilities > threshold, structure)
    defects = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels == index
        box = (cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(inside.sum()))
        defects.append((*box, float(probabilities[inside].astype(np.float64).mean())))
    return defects


@pytest.fixture(scope="module")
def network():
    model = CheapNet(2, impl="lax")
    return model, init_variables(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "height, width, tile, quantile",
    [
        (200, 300, 64, 0.3),  # most pixels foreground: components across many seams
        (200, 300, 64, 0.7),
        (130, 77, 32, 0.5),  # neither side a multiple of 16 or of the tile
        (40, 500, 48, 0.5),  # a single row of tiles, shorter than a crop
        (96, 96, 256, 0.5),  # one tile larger than the image
    ],
)
def test_tiled_detection_equals_whole_image(network, height, width, tile, quantile):
    model, variables = network
    image = _smooth_image(np.random.default_rng(height + width), height, width)
    whole = _whole(model, variables, image)
    threshold = float(np.quantile(whole, quantile))
    tile_detector = make_tile_detector(model, threshold=threshold, normalization=NORMALIZATION)
    found = detect_tiled(
        tile_detector, variables, image, tile=tile, max_components=4096, keep_maps=True
    )
    # lax convolutions: the same sums in every tile shape, so the map is equal bit for bit
    np.testing.assert_array_equal(found.probabilities, whole)
    np.testing.assert_array_equal(found.mask, whole > threshold)
    expected = _scipy_defects(whole, threshold)
    got_defects = found.defects
    got = [(d.x1, d.y1, d.x2, d.y2, d.area, d.score) for d in got_defects]
    assert [d[:5] for d in got] == [d[:5] for d in expected]
    np.testing.assert_allclose([d[5] for d in got], [d[5] for d in expected], rtol=2e-6)
    assert found.overflow == 0 and found.parts_left_out == 0
    # the case is what it claims: defects that cross seams, tiles at the border
    if tile < min(height, width):
        seams = [(d.x2 // tile - d.x1 // tile) + (d.y2 // tile - d.y1 // tile) for d in got_defects]
        assert max(seams) >= 2


def test_fused_layers_agree_to_two_ulps(network):
    """The CPU's default layer form is fused by XLA:CPU differently for each array shape (and
    multiply-adds contracted differently): the tiled map is within 2 float32 ulps of the whole
    image's on a few percent of the pixels (measured 4%), equal elsewhere."""
    _, variables = network
    model = CheapNet(2, impl="fused")
    image = _smooth_image(np.random.default_rng(5), 112, 150)
    whole = _whole(model, variables, image)
    tile_detector = make_tile_detector(model, threshold=0.5, normalization=NORMALIZATION)
    found = detect_tiled(tile_detector, variables, image, tile=48, keep_maps=True)
    np.testing.assert_array_max_ulp(found.probabilities, whole, maxulp=2)
    assert np.mean(found.probabilities != whole) < 0.1


def test_caps_and_min_area_match_the_whole_image_detector(network):
    """max_components keeps the first defects in raster order, then min_area filters: as the
    whole-image detector does; 4-connectivity merges across seams too."""
    model, variables = network
    image = _smooth_image(np.random.default_rng(7), 160, 176)
    whole = _whole(model, variables, image)
    threshold = float(np.quantile(whole, 0.6))
    for connectivity, cap, min_area in [(8, 12, 30), (4, 4096, 5)]:
        settings = dict(threshold=threshold, connectivity=connectivity)
        detector = make_detector(
            model, **settings, max_components=cap, min_area=min_area, normalization=NORMALIZATION
        )
        reference = jax.device_get(
            detector(variables, jnp.asarray(pad_to_multiple(image)[None]), crop=image.shape)
        )
        rows = reference.stats[0][reference.valid[0]].tolist()
        tile_detector = make_tile_detector(model, **settings, normalization=NORMALIZATION)
        found = detect_tiled(
            tile_detector,
            variables,
            image,
            tile=48,
            max_components=cap,
            min_area=min_area,
            connectivity=connectivity,
        )
        assert [[d.x1, d.y1, d.x2, d.y2, d.area] for d in found.defects] == rows
        assert found.overflow == int(reference.overflow[0])
        if connectivity == 4:
            assert _scipy_defects(whole, threshold, 4)[0][:5] == tuple(rows[0])


def test_strip_in_chunks_emits_final_defects_early(network):
    """A 600-row strip fed in uneven chunks: the same defects as the whole image, most of them
    emitted before the strip ends, none emitted twice or changed later."""
    model, variables = network
    image = _smooth_image(np.random.default_rng(11), 600, 90)
    whole = _whole(model, variables, image)
    threshold = float(np.quantile(whole, 0.5))
    tile_detector = make_tile_detector(model, threshold=threshold, normalization=NORMALIZATION)
    strip = StripDetector(tile_detector, variables, width=90, tile=64, min_area=3)
    emitted_early, start = [], 0
    for size in [1, 7, 100, 0, 33, 150, 200]:
        emitted_early += strip.push(image[start : start + size])
        for defect in emitted_early:  # only rows already pushed can have made it
            assert defect.y2 < start + size
        start += size
    emitted_late = strip.push(image[start:]) + strip.finish()
    got = [(d.x1, d.y1, d.x2, d.y2, d.area) for d in sorted(emitted_early + emitted_late)]
    expected = [d[:5] for d in _scipy_defects(whole, threshold) if d[4] >= 3]
    assert sorted(got) == sorted(expected)
    assert len(emitted_early) > len(expected) / 2


def test_bad_settings_are_refused(network):
    model, variables = network
    with pytest.raises(ValueError, match="multiple of 16"):
        check_tile(40)
    tile_detector = make_tile_detector(model, normalization=NORMALIZATION)
    strip = StripDetector(tile_detector, variables, width=64, tile=64)
    with pytest.raises(ValueError, match=r"uint8 \[h, 64\]"):
        strip.push(np.zeros((3, 65), np.uint8))
    strip.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        strip.push(np.zeros((3, 64), np.uint8))
