"""Inference inputs and precision: uint8 pixels normalised on the device, and bfloat16."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import checkpoint_path

from cheapnet_jax import data, load_torch_checkpoint
from cheapnet_jax.cli.evaluate import main as evaluate_main
from cheapnet_jax.detection import make_detector, normalize_on_device
from cheapnet_jax.model import ConvBlock


def test_device_normalisation_is_the_host_formula():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    on_device = jax.jit(lambda p: normalize_on_device(p, 0.3, 0.2))(pixels)
    eager = normalize_on_device(jnp.asarray(pixels), 0.3, 0.2)
    host = data.normalize(pixels, 0.3, 0.2)
    for found in (on_device, eager):
        assert found.shape == host.shape == (1, 16, 16, 1) and found.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(found), host)


def test_uint8_images_give_the_detections_of_host_normalised_ones(samples_folder):
    model, variables = load_torch_checkpoint(checkpoint_path(2))
    images = np.stack([data.read_sample(s)[0] for s in data.list_dagm_samples(samples_folder)])
    detector = make_detector(model, normalization=(data.CLASS6_MEAN, data.CLASS6_STD))
    from_pixels = detector(variables, jnp.asarray(images[:4]))
    from_floats = detector(variables, jnp.asarray(data.normalize(images[:4])))
    for name in ("probabilities", "labels", "stats", "scores"):
        np.testing.assert_array_equal(getattr(from_pixels, name), getattr(from_floats, name))


def test_uint8_images_without_normalization_are_refused():
    model, variables = load_torch_checkpoint(checkpoint_path(2))
    with pytest.raises(ValueError, match="normalization"):
        make_detector(model)(variables, jnp.zeros((1, 16, 16), jnp.uint8))


# Measured on the 10 real samples (the outputs of the blocks at full, 1/2 and 1/4 resolution
# stored as bfloat16, centred on leaky_relu(BatchNorm bias), each block computing in float32;
# the input float32): 99.978% of the pixels agree for G=2 and 99.990% for G=32 (99.89% /
# 99.96% when every block was stored uncentred with a bfloat16 input). G=2 stays short of the
# 99.99% the issue asks for: rounding the full-resolution decoder4 output alone already flips
# 0.014% of its pixels (BENCHMARKS.md).
BFLOAT16_AGREEMENT_FLOOR = {2: 0.9997, 32: 0.9999}


def test_bfloat16_storage_is_centred_on_the_batch_norm_bias():
    """A channel far from 0 with little spread keeps its signal when stored as bfloat16: the
    block stores ``output - leaky_relu(bias)``, and that plus the offset is the output to
    bfloat16's relative precision of the deviation, not of the value."""
    block = ConvBlock(features=2, kernel_size=1, storage_dtype=jnp.bfloat16)
    bias = np.array([3.0, -2.0], np.float32)  # offsets 3.0 and leaky_relu(-2.0) = -0.4
    variables = {
        "params": {
            "conv": {"kernel": np.ones((1, 1, 1, 2), np.float32), "bias": np.zeros(2, np.float32)},
            "bn": {"scale": np.array([0.03, 0.02], np.float32), "bias": bias},
        },
        "batch_stats": {"bn": {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}},
    }
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 1)).astype(np.float32)
    pre_activation = x * np.array([0.03, 0.02], np.float32) / np.sqrt(1 + 1e-5) + bias
    expected = np.where(pre_activation > 0, pre_activation, 0.2 * pre_activation)

    def apply(variables: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return block.apply(variables, (x, None), False)

    for run in (apply, jax.jit(apply)):
        stored, offset = run(variables, jnp.asarray(x))
        assert stored.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(offset), [3.0, -0.4], rtol=1e-6)
        restored = np.asarray(stored, np.float32) + np.asarray(offset)
        deviation = np.abs(expected - np.asarray(offset))
        assert np.all(np.abs(restored - expected) <= 2.0**-8 * deviation + 1e-7)
        uncentred = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32)
        assert np.abs(uncentred - expected).max() > 10 * np.abs(restored - expected).max()


@pytest.mark.parametrize("features", [2, 32])
def test_bfloat16_masks_agree_with_float32_on_the_real_samples(features, samples_folder):
    """The pixel verdicts of ``dtype="bfloat16"`` against float32 on the 10 real samples."""
    model, variables = load_torch_checkpoint(checkpoint_path(features))
    images = np.stack([data.read_sample(s)[0] for s in data.list_dagm_samples(samples_folder)])
    normalization = (data.CLASS6_MEAN, data.CLASS6_STD)
    masks = {}
    for dtype in ("float32", "bfloat16"):
        detector = make_detector(model, dtype=dtype, normalization=normalization)
        masks[dtype] = np.concatenate(
            [np.asarray(detector(variables, jnp.asarray(images[i : i + 5])).masks) for i in (0, 5)]
        )
    agreement = float(np.mean(masks["float32"] == masks["bfloat16"]))
    assert masks["float32"].sum() > 1000  # defects are found: the comparison means something
    assert BFLOAT16_AGREEMENT_FLOOR[features] <= agreement < 1, agreement


def test_evaluate_dtype_flag(tmp_path, capsys):
    """``evaluate.py --dtype bfloat16`` runs and records its dtype; figures near float32's."""
    figures = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        args = ["--data", "synthetic", "--image-size", "64", "--no-progress"]
        assert evaluate_main([*args, "--dtype", dtype, "--json", str(out)]) == 0
        figures[dtype] = json.loads(out.read_text())
    assert figures["bfloat16"]["dtype"] == "bfloat16"
    assert figures["bfloat16"]["miou"] == pytest.approx(figures["float32"]["miou"], abs=0.02)
    with pytest.raises(SystemExit) as refused:
        evaluate_main(["--dtype", "float16"])
    assert refused.value.code == 2 and "--dtype" in capsys.readouterr().err
