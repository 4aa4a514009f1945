"""The synthetic DAGM-like data: ten texture families, defects inside weak ellipse labels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_tool
from scipy import ndimage

from cheapnet_jax import synthetic
from cheapnet_jax.data import list_dagm_samples, read_sample


@pytest.mark.parametrize("name", list(synthetic.FAMILIES))
def test_every_family_is_a_standardized_field(name):
    texture = synthetic.FAMILIES[name](np.random.default_rng(0), 64)
    assert texture.shape == (64, 64) and texture.dtype == np.float64
    assert abs(texture.mean()) < 1e-9 and abs(texture.std() - 1) < 1e-6


def test_there_are_ten_distinct_families():
    assert len(synthetic.FAMILIES) == 10
    fields = [f(np.random.default_rng(0), 64).ravel() for f in synthetic.FAMILIES.values()]
    correlations = np.corrcoef(fields)
    assert np.abs(correlations[~np.eye(10, dtype=bool)]).max() < 0.9


def test_streaks_run_along_one_axis_and_gratings_repeat():
    rng = np.random.default_rng(3)
    streaks = synthetic.streaks(rng, 128)
    along_rows = np.mean(streaks[1:] * streaks[:-1])
    along_cols = np.mean(streaks[:, 1:] * streaks[:, :-1])
    assert max(along_rows, along_cols) > 0.9 > 0.6 > min(along_rows, along_cols)
    spectrum = np.abs(np.fft.fft2(synthetic.grating(rng, 128))) ** 2
    spectrum[0, 0] = 0
    assert spectrum.max() > 0.2 * spectrum.sum() / 2  # one frequency pair holds the energy


def test_splits_are_deterministic_disjoint_and_hold_every_family():
    images, masks = synthetic.make_split("train", 10, 64, seed=5)
    again, _ = synthetic.make_split("train", 10, 64, seed=5)
    np.testing.assert_array_equal(images, again)
    other_seed, _ = synthetic.make_split("train", 10, 64, seed=6)
    validation, _ = synthetic.make_split("validation", 10, 64, seed=5)
    assert not np.array_equal(images, other_seed) and not np.array_equal(images, validation)
    assert images.shape == masks.shape == (10, 64, 64)
    assert images.dtype == np.uint8 and masks.dtype == bool


@pytest.mark.parametrize("family", range(10))
def test_the_defect_is_darker_and_lies_inside_one_elliptic_label(family):
    image, mask = synthetic.make_sample(np.random.default_rng(family), 128, True, family)
    _, count = ndimage.label(mask)
    assert count == 1 and 0.001 < mask.mean() < 0.1
    assert ndimage.binary_fill_holes(mask).sum() == mask.sum()
    core = ndimage.binary_erosion(mask, iterations=3)
    assert image[core].mean() < image[~mask].mean() - 25


def test_defect_free_samples_have_an_empty_mask():
    _, mask = synthetic.make_sample(np.random.default_rng(0), 32, defective=False)
    assert not mask.any()


@pytest.mark.parametrize("size", [0, 100, 513])
def test_sizes_must_be_multiples_of_16(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        synthetic.make_sample(np.random.default_rng(0), size, True)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'tests'"):
        synthetic.make_split("tests", 1, 32)


def test_written_folder_reads_back_as_dagm(tmp_path):
    folder = synthetic.write_dagm_folder(tmp_path / "Class3" / "Train", count=4, size=32, seed=2)
    images, masks = synthetic.make_split("test", 4, 32, seed=2)
    samples = list_dagm_samples(folder)
    assert [s.name for s in samples] == ["0001.PNG", "0002.PNG", "0003.PNG", "0004.PNG"]
    for sample, image, mask in zip(samples, images, masks, strict=True):
        read_image, read_mask = read_sample(sample)
        np.testing.assert_array_equal(read_image, image)
        np.testing.assert_array_equal(read_mask, mask)


def test_command_line_writes_a_folder(tmp_path):
    result = run_tool(
        "-m cheapnet_jax.cli.synthetic",
        "--out",
        str(tmp_path / "new"),
        "--count",
        "3",
        "--size",
        "32",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 synthetic 32x32 images" in result.stdout
    assert len(list_dagm_samples(tmp_path / "new")) == 3
