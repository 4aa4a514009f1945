"""Exports loaded back and compared with the JAX model on the real samples."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, checkpoint_path, cli_env

from cheapnet_jax import load_torch_checkpoint
from cheapnet_jax.data import list_dagm_samples, normalize, read_sample
from cheapnet_jax.export import load_stablehlo


@pytest.fixture
def samples(samples_folder):
    images = [read_sample(s)[0] for s in list_dagm_samples(samples_folder)[:3]]
    return normalize(np.stack(images))


def export(fmt: str, out) -> None:
    command = [
        sys.executable,
        "-m",
        "cheapnet_jax.export",
        "--checkpoint",
        str(checkpoint_path(8)),
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, env=cli_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout


def jax_probabilities(x):
    model, variables = load_torch_checkpoint(checkpoint_path(8))
    return np.asarray(jax.nn.sigmoid(model.apply(variables, x)))


def test_onnx_runs_in_onnxruntime(samples, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime checks the ONNX export")
    export("onnx", tmp_path / "g8.onnx")
    session = ort.InferenceSession(str(tmp_path / "g8.onnx"), providers=["CPUExecutionProvider"])
    for batch in (samples[:1], samples):  # the batch dimension is dynamic
        (probabilities,) = session.run(None, {"x": batch.transpose(0, 3, 1, 2)})
        expected = jax_probabilities(batch)
        assert np.max(np.abs(probabilities.transpose(0, 2, 3, 1) - expected)) <= 1e-4


def test_stablehlo_reloads_without_the_model_code(samples, tmp_path):
    export("stablehlo", tmp_path / "g8.stablehlo")
    run = load_stablehlo(tmp_path / "g8.stablehlo")
    for batch in (samples[:2], samples):
        assert np.max(np.abs(np.asarray(run(batch)) - jax_probabilities(batch))) <= 1e-4


def test_torch_export_is_the_authors_format(tmp_path):
    torch = pytest.importorskip("torch")
    export("torch", tmp_path / "g8.pkl")
    exported = torch.load(tmp_path / "g8.pkl", weights_only=True)["CheapNet"]
    original = torch.load(checkpoint_path(8), map_location="cpu", weights_only=True)["CheapNet"]
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], tensor), key
