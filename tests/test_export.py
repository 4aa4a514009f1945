"""Exports written by the command-line tool, loaded back by their own runtimes and compared with
an independent PyTorch CheapNet (`torch_reference`): a random-weight model on synthetic images
(always), and the authors' G=8 checkpoint on the real samples where ../shared has them."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import checkpoint_path, run_tool
from PIL import Image
from scipy import ndimage

from cheapnet_jax.data import (
    CLASS6_MEAN,
    CLASS6_STD,
    list_dagm_samples,
    normalize,
    pad_to_multiple,
    read_sample,
)
from cheapnet_jax.export import load_stablehlo, load_stablehlo_pipeline
from cheapnet_jax.synthetic import make_split

torch = pytest.importorskip("torch")
from torch_reference import (  # noqa: E402
    load_reference,
    probabilities_nhwc,
    random_reference,
    save_reference,
)


@pytest.fixture(params=["random", "authors"])
def source(request, tmp_path):
    """``(checkpoint path, PyTorch reference model, normalised NHWC images)``."""
    if request.param == "random":
        path = tmp_path / "random.pkl"
        reference = random_reference(4, seed=3)
        save_reference(reference, path)
        images = make_split("validation", 3, 64, seed=0)[0]
        return path, reference, normalize(images)
    samples_folder = request.getfixturevalue("samples_folder")
    path = checkpoint_path(8)
    images = [read_sample(s)[0] for s in list_dagm_samples(samples_folder)[:3]]
    return path, load_reference(path), normalize(np.stack(images))


def export(checkpoint, fmt: str, out, image_size: int) -> None:
    result = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(checkpoint), "--format", fmt,
        "--out", str(out), "--image-size", str(image_size), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout


def test_onnx_runs_in_onnxruntime(source, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime checks the ONNX export")
    checkpoint, reference, images = source
    export(checkpoint, "onnx", tmp_path / "model.onnx", images.shape[1])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # the batch dimension is dynamic
        (probabilities,) = session.run(None, {"x": batch.transpose(0, 3, 1, 2)})
        expected = probabilities_nhwc(reference, batch)
        assert np.max(np.abs(probabilities[:, 0] - expected)) <= 1e-4


def test_stablehlo_reloads_without_the_model_code(source, tmp_path):
    checkpoint, reference, images = source
    export(checkpoint, "stablehlo", tmp_path / "model.stablehlo", images.shape[1])
    run = load_stablehlo(tmp_path / "model.stablehlo")
    for batch in (images[:2], images):
        expected = probabilities_nhwc(reference, batch)
        assert np.max(np.abs(np.asarray(run(batch))[..., 0] - expected)) <= 1e-4


def test_torch_export_is_the_authors_format(source, tmp_path):
    checkpoint, _, images = source
    export(checkpoint, "torch", tmp_path / "model.pkl", images.shape[1])
    exported = torch.load(tmp_path / "model.pkl", weights_only=True)["CheapNet"]
    original = torch.load(checkpoint, map_location="cpu", weights_only=True)["CheapNet"]
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], tensor), key


def _scipy_components(mask: np.ndarray) -> list[list[int]]:
    labels, _ = ndimage.label(mask, np.ones((3, 3)))
    return [
        [cols.start, rows.start, cols.stop - 1, rows.stop - 1, int((labels[rows, cols] == i).sum())]
        for i, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1)
    ]


@pytest.mark.parametrize("shape", [(64, 48), (40, 37)])
def test_pipeline_artifact_runs_images_to_defects(shape, tmp_path):
    """A random-weight model's pipeline for an image size that needs padding, exported for the
    CPU and CUDA at once: reloaded without the model code, the masks are the PyTorch
    reference's (but for pixels within 1e-4 of the threshold), boxes and areas are scipy's
    components of that mask, scores the reference's mean probabilities; the export's parity
    report is beside it."""
    height, width = shape
    reference = random_reference(4, seed=3)
    save_reference(reference, tmp_path / "random.pkl")
    out = tmp_path / "pipeline.stablehlo"
    result = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(tmp_path / "random.pkl"),
        "--format", "stablehlo", "--pipeline", "--image-size", f"{height}x{width}",
        "--normalization", "0.4,0.3", "--min-area", "2", "--platforms", "cpu,cuda",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "parity with the JAX pipeline: 3/3 images with the same defects" in result.stdout
    report = json.loads((tmp_path / "pipeline.stablehlo.parity.json").read_text())
    assert report["platforms"] == ["cpu", "cuda"] and report["all_same_defects"] is True
    assert report["settings"]["min_area"] == 2
    assert sum(image["defects"] for image in report["images"]) > 0

    images = make_split("validation", 2, 64, seed=1)[0][:, :height, :width]
    found = jax.device_get(load_stablehlo_pipeline(out)(images))
    _check_against_reference(found, images, reference, (0.4, 0.3), min_area=2)


def test_pipeline_artifact_of_the_authors_checkpoint_on_real_samples(samples_folder, tmp_path):
    paths = [str(s.image_path) for s in list_dagm_samples(samples_folder)[:2]]
    out = tmp_path / "g2.stablehlo"
    result = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(checkpoint_path(2)), "--format",
        "stablehlo", "--pipeline", "--parity-images", *paths, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2/2 images with the same defects" in result.stdout
    images = np.stack([read_sample(s)[0] for s in list_dagm_samples(samples_folder)[:2]])
    found = jax.device_get(load_stablehlo_pipeline(out)(images))
    assert found["valid"].any()  # the samples are defective
    reference = load_reference(checkpoint_path(2))
    # float32 JAX and PyTorch differ by up to 1.8e-4 in this trained network's probabilities
    normalization = (CLASS6_MEAN, CLASS6_STD)
    _check_against_reference(found, images, reference, normalization, 0, tolerance=5e-4)


def _check_against_reference(found, images, reference, normalization, min_area, tolerance=1e-4):
    """Masks are the PyTorch reference's (but for pixels within ``tolerance`` of the 0.5
    threshold), boxes and areas scipy's components of that mask, scores the reference's mean
    probability to ``tolerance``."""
    height, width = images.shape[1:]
    assert found["masks"].shape == images.shape
    padded = np.stack([pad_to_multiple(image) for image in images])
    expected = probabilities_nhwc(reference, normalize(padded, *normalization))
    for index in range(len(images)):
        probabilities = expected[index, :height, :width]
        mask = found["masks"][index]
        certain = np.abs(probabilities - 0.5) > tolerance
        np.testing.assert_array_equal(mask[certain], probabilities[certain] > 0.5)
        labels, _ = ndimage.label(mask, np.ones((3, 3)))
        components = _scipy_components(mask)
        kept = [c[4] >= min_area for c in components]
        valid = found["valid"][index]
        rows = np.concatenate([found["boxes"][index], found["areas"][index][:, None]], axis=1)
        assert rows[valid].tolist() == [c for c, k in zip(components, kept, strict=True) if k]
        means = [probabilities[labels == i].mean() for i in range(1, len(components) + 1)]
        kept_means = [m for m, k in zip(means, kept, strict=True) if k]
        np.testing.assert_allclose(found["scores"][index][valid], kept_means, atol=tolerance)


def test_pipeline_settings_are_checked(tmp_path):
    reference = random_reference(2, seed=0)
    save_reference(reference, tmp_path / "m.pkl")
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "small.png")
    common = ["-m cheapnet_jax.cli.export", "--checkpoint", str(tmp_path / "m.pkl")]
    onnx = run_tool(*common, "--format", "onnx", "--pipeline", "--out", str(tmp_path / "a"))
    assert onnx.returncode == 1
    assert onnx.stderr.strip() == "error: --pipeline exports StableHLO only, not --format onnx"
    wrong_size = run_tool(
        *common, "--format", "stablehlo", "--pipeline", "--image-size", "32",
        "--parity-images", str(tmp_path / "small.png"), "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert wrong_size.returncode == 1
    assert f"{tmp_path / 'small.png'}: 30x20 pixels" in wrong_size.stderr
    assert not (tmp_path / "b").exists()
    bad_shape = run_tool(
        *common, "--format", "stablehlo", "--pipeline", "--image-size", "0x5",
        "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert bad_shape.returncode == 2 and "argument --image-size" in bad_shape.stderr
    not_sixteen = run_tool(
        *common, "--format", "onnx", "--image-size", "40", "--out", str(tmp_path / "d")
    )
    assert not_sixteen.returncode == 2 and "multiple of 16" in not_sixteen.stderr
