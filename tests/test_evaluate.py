"""evaluate.py end to end, and the parameter/GFLOP figures it reports."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest
from conftest import checkpoint_path, run_tool

from cheapnet_jax import CheapNet
from cheapnet_jax.checkpoints import LoadedModel
from cheapnet_jax.evaluation import evaluate_folder
from cheapnet_jax.flops import paper_gflops, xla_gflops
from cheapnet_jax.inspection import Inspector, InspectorOptions
from cheapnet_jax.model import init_variables
from cheapnet_jax.synthetic import write_dagm_folder

LEVEL_SCALES = (1, 1 / 4, 1 / 16, 1 / 64, 1 / 256)  # pixels of encoder1..bottleneck / H*W


def thop_count_per_pixel(features: int) -> float:
    """The paper's (thop) count per input pixel, derived from the architecture by hand:
    conv multiply-adds without bias (transposed conv: outputs * Cin/groups * 9), 4 per BN
    element, activations free."""
    g = features
    encoders = 9 * g * sum(LEVEL_SCALES[:5])  # encoder1 (1 input channel) + 4 depthwise
    decoder1 = 9 * g / 64  # output at H/8, one input channel per group
    decoders = 18 * g * (1 / 16 + 1 / 4 + 1)  # two input channels per group
    output = 2 * g
    bn_elements = g * (sum(LEVEL_SCALES) + 1 / 64 + 1 / 16 + 1 / 4 + 1) + 1
    return encoders + decoder1 + decoders + output + 4 * bn_elements


@pytest.mark.parametrize("features", [1, 2, 32, 1024])
def test_paper_gflops_formula_is_the_thop_count(features):
    by_hand = thop_count_per_pixel(features) * 512 * 512 / 1e9
    assert paper_gflops(features) == pytest.approx(by_hand, rel=2e-3)


def real_multiply_adds_per_pixel(features: int) -> float:
    """Multiply-adds actually needed: a stride-2 transposed conv touches on average 9/4 taps
    per output (the others meet the zeros of the dilated input), where thop counts all 9."""
    g = features
    transposed = 9 * g / 64 + 18 * g * (1 / 16 + 1 / 4 + 1)
    return 9 * g * sum(LEVEL_SCALES) + 2 * g + transposed / 4


def test_xla_gflops_counts_every_multiply_add():
    features, size = 4, 64
    model = CheapNet(features)
    flops = xla_gflops(model, init_variables(model, jax_key()), size, size) * 1e9
    multiply_adds = real_multiply_adds_per_pixel(features) * size * size
    activations = (features * (sum(LEVEL_SCALES) + 1 / 64 + 1 / 16 + 1 / 4 + 1) + 1) * size**2
    # XLA counts 2 FLOPs per multiply-add, plus bias, BN, LeakyReLU and sigmoid element-wise.
    assert 2 * multiply_adds <= flops <= 2 * multiply_adds + 40 * activations


def jax_key():
    import jax

    return jax.random.key(0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_tool("evaluate.py", "--no-progress", *args)


def test_cli_reproduces_reference_g2(samples_folder, tmp_path):
    out = tmp_path / "g2.json"
    result = run_cli(
        "--checkpoint", str(checkpoint_path(2)), "--data", str(samples_folder), "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["params"] == 277
    assert figures["miou"] == pytest.approx(0.8715, abs=5e-4)
    assert figures["iou_defect"] == pytest.approx(0.7661, abs=5e-4)
    assert figures["macc"] == pytest.approx(0.9124, abs=5e-4)
    assert figures["pixel_acc"] == pytest.approx(0.9786, abs=5e-4)
    assert figures["gflops_paper"] == pytest.approx(paper_gflops(2))
    assert "mIoU" in result.stdout and "0.8715" in result.stdout
    assert "image_level" not in figures  # every real sample is defective: no FPR to measure
    assert "false alarm rate" not in result.stdout


def test_cli_smoke_run_on_synthetic_data(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_cli("--variant", "S", "--json", str(out))
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["images"] == 24 and figures["params"] == 277
    assert 0.0 <= figures["miou"] <= 1.0
    assert figures["image_level"]["good_images"] == 8  # the synthetic default has good images


def test_cli_bad_folder_names_it(tmp_path):
    result = run_cli("--data", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "error: " in result.stderr and "missing: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_corrupt_image_midway_keeps_the_figures_of_the_images_before_it(tmp_path):
    folder = write_dagm_folder(tmp_path / "bad", count=12, size=32, seed=3)
    (folder / "0011.PNG").write_bytes((folder / "0011.PNG").read_bytes()[:100])
    out = tmp_path / "partial.json"
    result = run_cli("--data", str(folder), "--batch-size", "2", "--json", str(out))
    assert result.returncode == 1
    assert "0011.PNG: cannot decode image" in result.stderr
    assert "stopped after 10 of 12 images" in result.stderr and "Traceback" not in result.stderr
    partial = json.loads(out.read_text())
    assert partial["images"] == 10 and "0011.PNG" in partial["incomplete"]
    # the same as evaluating a folder of just those ten images
    first_ten = write_dagm_folder(tmp_path / "ten", count=10, size=32, seed=3)
    model = CheapNet(2)
    variables = init_variables(model, jax.random.key(0))  # evaluate.py's untrained model
    inspector = Inspector(LoadedModel(model, variables, "untrained"), options=InspectorOptions(2))
    expected = evaluate_folder(inspector, first_ten, progress=False)
    assert partial["confusion"] == expected["confusion"]
    assert partial["map_component"] == pytest.approx(expected["map_component"])


def test_jit_bench_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "--jit-bench",
        "--variants",
        "S",
        "--batch-sizes",
        "1,2",
        "--image-size",
        "64",
        "--runs",
        "3",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "seg+label img/s" in result.stdout and "device:" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(row["G"], row["batch"]) for row in rows] == [(2, 1), (2, 2)]
    for row in rows:
        assert row["params"] == 277
        for name in ("seg", "seg+label"):
            assert row[f"{name} img/s"] > 0 and row[f"{name} compile s"] > 0
            assert row[f"{name} ms/img"] * row[f"{name} img/s"] == pytest.approx(1000)


def test_a_checkpoint_with_nan_weights_is_refused_by_every_tool(tmp_path):
    pytest.importorskip("torch")
    from cheapnet_jax.torch_import import save_torch_checkpoint

    model = CheapNet(2)
    variables = init_variables(model, jax_key())
    kernel = np.array(variables["params"]["decoder2"]["conv"]["kernel"])
    kernel[0, 0, 0, 0] = np.nan
    variables["params"]["decoder2"]["conv"]["kernel"] = kernel
    path = tmp_path / "nan.pkl"
    save_torch_checkpoint(variables, path)
    images = tmp_path / "images"
    write_dagm_folder(images, count=1, size=32)
    for tool, extra in (
        ("evaluate.py", ["--data", str(images)]),
        ("predict.py", [str(images), "--out", str(tmp_path / "out")]),
        ("-m cheapnet_jax.cli.export", ["--format", "onnx", "--out", str(tmp_path / "m.onnx")]),
    ):
        result = run_tool(tool, "--checkpoint", str(path), *extra)
        assert result.returncode == 1, (tool, result.stderr)
        assert f"error: {path}: non-finite weights" in result.stderr, tool
        assert "decoder2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "out").exists()
