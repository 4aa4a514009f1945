"""Many devices end to end, the way users run it: a run trained on N devices is evaluated,
served, exported and resumed by new processes with other device counts, started from other
folders with the path typed differently (a run of several processes: test_tfds_loop).

Every command runs in a subprocess whose environment does not inherit this process's 8 host
devices (`conftest.cli_env`); 64-bit runs (``--dtype float64``) make "the same run" testable to
1e-9.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import run_tool, shared_across_workers

from cheapnet_jax.checkpoints import load_orbax_checkpoint
from cheapnet_jax.torch_import import load_torch_checkpoint

TINY_RUN = (
    "--variant",
    "S",
    "--data",
    "synthetic",
    "--image-size",
    "32",
    "--synthetic-train",
    "16",
    "--synthetic-validation",
    "8",
    "--batch-size",
    "8",
    "--milestones",
    "1",
    "--no-progress",
)


# The float64 runs, which compare device and process counts, train with the layers that
# accelerators run (``impl="auto"`` picks ``lax`` on GPUs and TPUs, where several devices are
# real); their training step compiles in about a third of the time of the fused CPU layers'
# (4 s against 9-12 s). The fused layers' training is tested on one device (test_training,
# test_population) and against lax (test_model), and the M run below trains with the defaults.
FLOAT64_RUN = ("--dtype", "float64", "--impl", "lax")


def train(workdir, devices: int, *extra: str, epochs: int = 2) -> subprocess.CompletedProcess:
    """train.py in a plain process; it simulates ``devices`` CPU devices itself."""
    result = run_tool(
        "train.py", *TINY_RUN, "--devices", str(devices), "--epochs", str(epochs),
        "--workdir", str(workdir), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def variables_of(workdir) -> list[np.ndarray]:
    with jax.enable_x64(True):
        _, variables, _ = load_orbax_checkpoint(workdir)
        return [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]


def assert_same_variables(a, b, atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="session")
def float64_run_on_eight_devices(tmp_path_factory):
    """TINY_RUN for 2 epochs with FLOAT64_RUN on 8 devices: what the same run resumed on other
    device counts must give, to 1e-9 (several processes are compared with one in
    test_tfds_loop, whose one-process run reads this run's program from the cache). Trained
    once for all workers."""

    def build(folder):
        train(folder / "run", 8, *FLOAT64_RUN)

    return shared_across_workers(tmp_path_factory, "float64-eight-devices", build) / "run"


@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory):
    def build(folder):
        result = train(folder / "run", 8, "--variant", "M")  # `--variant M --devices 8`
        assert "simulating 8 CPU devices" in result.stdout

    return shared_across_workers(tmp_path_factory, "m-eight-devices", build) / "run"


def test_a_run_on_eight_devices_is_evaluated_by_one_and_by_three(eight_device_run, tmp_path):
    # From another folder, the workdir typed as a relative path with a detour and a slash.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    parent = eight_device_run.parent
    typed = f"{os.path.relpath(parent, elsewhere)}/../{parent.name}/./run/"
    figures = {}
    for devices in (None, 3):
        out = tmp_path / f"eval-{devices}.json"
        result = run_tool(
            "evaluate.py", "--checkpoint", typed, "--no-progress", "--json", str(out),
            devices=devices, cwd=elsewhere, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        figures[devices] = json.loads(out.read_text())
    assert figures[None]["features"] == 32 and figures[None]["image_size"] == [32, 32]
    # The same checkpoint gives the same figures whatever the reading process's devices.
    for key in ("miou", "iou_defect", "confusion", "map_component"):
        assert figures[None][key] == figures[3][key], key


def test_a_run_on_eight_devices_is_served_and_exported_by_one(eight_device_run, tmp_path):
    images = tmp_path / "images"
    made = run_tool(
        "-m cheapnet_jax.cli.synthetic", "--out", str(images), "--count", "3", "--size", "48"
    )
    assert made.returncode == 0, made.stderr
    predicted = run_tool(
        "predict.py", "--checkpoint", str(eight_device_run), str(images), "--out",
        str(tmp_path / "out"), "--no-progress", timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    records = json.loads((tmp_path / "out" / "defects.json").read_text())
    assert len(records) == 3 and all(r["verdict"] in ("OK", "NG") for r in records)

    exported = tmp_path / "model.pkl"
    result = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(eight_device_run), "--format", "torch",
        "--out", str(exported), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The Python API in this 8-device process: every array on one local device, and equal to
    # what the 1-device export wrote.
    _, variables, _ = load_orbax_checkpoint(eight_device_run)
    for leaf in jax.tree.leaves(variables):
        assert leaf.sharding.device_set == {jax.local_devices()[0]}
    _, from_torch = load_torch_checkpoint(exported)
    assert_same_variables(jax.tree.leaves(variables), jax.tree.leaves(from_torch), atol=0)


def test_a_run_begun_on_2_devices_resumed_on_1_or_8_is_the_uninterrupted_run(
    float64_run_on_eight_devices, tmp_path
):
    """(Resuming on the device count that wrote the checkpoint: tests/test_training.py's and
    tests/test_population.py's kill-and-resume tests.)"""
    first = tmp_path / "first"
    train(first, 2, *FLOAT64_RUN, epochs=1)
    after_first = variables_of(first)
    uninterrupted = variables_of(float64_run_on_eight_devices)
    for devices in (1, 8):
        workdir = tmp_path / f"on{devices}"
        shutil.copytree(first, workdir)
        result = train(workdir, devices, *FLOAT64_RUN, epochs=2)
        assert "resumed from" in result.stdout and "at epoch 1 (step 2)" in result.stdout
        resumed = variables_of(workdir)
        assert resumed[0].dtype == np.float64
        assert_same_variables(resumed, uninterrupted, atol=1e-9)
        moved = max(np.abs(a - b).max() for a, b in zip(resumed, after_first, strict=True))
        assert moved > 1e-4  # the second epoch did train


def test_a_resume_with_other_settings_is_refused_unless_allowed(eight_device_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(eight_device_run, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
    common = (*TINY_RUN, "--variant", "M", "--devices", "1", "--epochs", "3")
    common = (*common, "--workdir", str(workdir))
    refused = run_tool("train.py", *common, "--seed", "5", "--lr", "0.5")
    assert refused.returncode == 1
    assert "lr: 0.01 -> 0.5" in refused.stderr and "seed: 0 -> 5" in refused.stderr
    assert "--allow-changes" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == before
    allowed = run_tool("train.py", *common, "--seed", "5", "--allow-changes")
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed from" in allowed.stdout and "epoch 3/3" in allowed.stdout
