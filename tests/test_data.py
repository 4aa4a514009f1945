"""DAGM folder reading: the happy path and every kind of bad input, each with its message."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from cheapnet_jax.data import (
    ConvertedImageWarning,
    DataError,
    iterate_batches,
    list_dagm_samples,
    load_image,
    normalize,
    read_sample,
    threaded_map,
)
from cheapnet_jax.synthetic import write_dagm_folder


@pytest.fixture
def folder(tmp_path):
    return write_dagm_folder(tmp_path / "Class1" / "Train", count=3, size=32, seed=1)


def test_reads_samples_in_labels_order(folder):
    samples = list_dagm_samples(folder)
    assert [s.name for s in samples] == ["0001.PNG", "0002.PNG", "0003.PNG"]
    image, mask = read_sample(samples[0])
    assert image.dtype == np.uint8 and image.shape == (32, 32)
    label = np.asarray(Image.open(folder / "Label" / "0001_label.PNG"))
    np.testing.assert_array_equal(mask, label > 0)


def test_defect_free_rows_get_an_empty_mask(folder):
    labels = folder / "Label" / "Labels.txt"
    labels.write_text(labels.read_text() + "4\t0\t0001.PNG\t0\t0\n")
    sample = list_dagm_samples(folder)[-1]
    assert sample.label_path is None
    assert not read_sample(sample)[1].any()


def test_real_samples_read(samples_folder):
    samples = list_dagm_samples(samples_folder)
    assert len(samples) == 10 and samples[0].class_id == 6
    image, mask = read_sample(samples[0])
    assert image.shape == mask.shape == (512, 512) and 0 < mask.mean() < 0.2


def test_normalize_matches_the_authors_formula():
    pixels = np.array([[0, 128, 255]], np.uint8)
    expected = (pixels / 255 - 0.348) / 0.278
    np.testing.assert_allclose(normalize(pixels)[..., 0], expected, rtol=1e-6)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        list_dagm_samples(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"Labels\.txt: missing"):
        list_dagm_samples(tmp_path)


def test_listed_image_missing(folder):
    (folder / "0002.PNG").unlink()
    with pytest.raises(DataError, match=r"0002\.PNG: listed in .*Labels\.txt:3 but missing"):
        list_dagm_samples(folder)


def test_listed_label_missing(folder):
    (folder / "Label" / "0003_label.PNG").unlink()
    with pytest.raises(DataError, match=r"0003_label\.PNG: listed in .*Labels\.txt:4 but missing"):
        list_dagm_samples(folder)


def test_corrupt_png(folder):
    path = folder / "0001.PNG"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"0001\.PNG: cannot decode image"):
        read_sample(list_dagm_samples(folder)[0])


def test_an_rgb_training_image_is_converted_as_predict_converts_it(folder):
    """One rule for colour input across the tools: training reads a colour image as Pillow's
    grayscale conversion (the one predict.py and the service apply), with a warning naming
    the file."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "0001.PNG")
    sample = list_dagm_samples(folder)[0]
    with pytest.warns(ConvertedImageWarning, match=r"0001\.PNG: converted from mode 'RGB'"):
        image, _ = read_sample(sample)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(image, expected)
    assert not np.array_equal(image, rgb[..., 0])
    with pytest.raises(DataError, match=r"0001\.PNG: image mode 'RGB' \(colour\)"):
        load_image(folder / "0001.PNG")  # without conversion asked for


def test_16_bit_png_is_rejected(folder):
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(folder / "0001.PNG")
    with pytest.raises(DataError, match=r"0001\.PNG: image mode 'I;16' \(16-bit\)"):
        read_sample(list_dagm_samples(folder)[0])


def test_size_not_multiple_of_16(folder):
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(folder / "0002.PNG")
    with pytest.raises(DataError, match=r"0002\.PNG: size 40x32 is not a multiple of 16"):
        read_sample(list_dagm_samples(folder)[1])


def test_label_size_differs_from_image(folder):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "Label" / "0001_label.PNG")
    with pytest.raises(DataError, match=r"0001_label\.PNG: label size 16x16 differs"):
        read_sample(list_dagm_samples(folder)[0])


def test_malformed_labels_line(folder):
    labels = folder / "Label" / "Labels.txt"
    labels.write_text(labels.read_text() + "oops\n")
    with pytest.raises(DataError, match=r"Labels\.txt:5: expected 'id defective image 0 label'"):
        list_dagm_samples(folder)


def test_batches_cover_every_sample_once(folder):
    batches = list(iterate_batches(list_dagm_samples(folder), batch_size=2))
    assert [len(chunk) for chunk, _, _ in batches] == [2, 1]
    assert batches[1][1].shape == (1, 32, 32)


def test_host_shares_cover_a_global_batch_once():
    from cheapnet_jax.data import epoch_order, host_share, shard_batch

    order = epoch_order(24, seed=3, epoch=5)
    np.testing.assert_array_equal(order, epoch_order(24, seed=3, epoch=5))
    assert not np.array_equal(order, epoch_order(24, seed=3, epoch=6))
    batch = order[:8]
    shares = [host_share(batch, index, 4) for index in range(4)]
    np.testing.assert_array_equal(np.concatenate(shares), batch)
    np.testing.assert_array_equal(host_share(batch), batch)  # one process: everything
    assert shard_batch(np.zeros((8, 4, 4, 1)), 4).shape == (4, 2, 4, 4, 1)
    with pytest.raises(ValueError, match="does not split over 3 hosts"):
        host_share(batch, 0, 3)


def test_threaded_map_keeps_order_and_stays_a_bounded_distance_ahead():
    started = []

    def slow_square(value):
        started.append(value)
        time.sleep(0.001 * (value % 3))  # finishing out of order must not reorder results
        return value * value

    results = threaded_map(slow_square, iter(range(100)), workers=3, ahead=5)
    assert [next(results) for _ in range(10)] == [v * v for v in range(10)]
    time.sleep(0.05)
    assert len(started) <= 10 + 5  # never more than `ahead` items beyond what was consumed
    assert list(results) == [v * v for v in range(10, 100)]


def test_threaded_map_raises_the_workers_error_in_order():
    def fail_on_three(value):
        if value == 3:
            raise DataError(f"item {value} is bad")
        return value

    results = threaded_map(fail_on_three, range(10), workers=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataError, match="item 3 is bad"):
        next(results)
