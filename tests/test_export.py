"""Exports written by the command-line tool, loaded back by their own runtimes and compared with
an independent PyTorch CheapNet (`torch_reference`): a random-weight model on synthetic images
(always), and the authors' G=8 checkpoint on the real samples where ../shared has them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import checkpoint_path, run_tool

from cheapnet_jax.data import list_dagm_samples, normalize, read_sample
from cheapnet_jax.export import load_stablehlo
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
        "-m cheapnet_jax.export", "--checkpoint", str(checkpoint), "--format", fmt,
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
