"""Nothing lost, nothing silently wrong: the command-line tools against bad settings, bad
files, a second run on the same folder, and paths typed differently. Each case asserts the
exit status, the one-line message and that nothing written earlier was lost."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from conftest import run_tool, small_config
from PIL import Image

from cheapnet_jax.files import exclusive_lock
from cheapnet_jax.inspection import compiled_batch_size
from cheapnet_jax.training import train_and_evaluate


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("train.py", ["--devices", "0"], "argument --devices: '0': must be >= 1"),
        ("train.py", ["--batch-size", "0"], "argument --batch-size: '0': must be >= 1"),
        ("train.py", ["--epochs", "0"], "argument --epochs: '0': must be >= 1"),
        ("train.py", ["--lr", "-0.1"], "argument --lr: '-0.1': must be > 0"),
        ("train.py", ["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
        ("train.py", ["--milestones", "90,60"], "argument --milestones: '90,60': must be incr"),
        ("train.py", ["--milestones", "x"], "argument --milestones: 'x' is not an integer"),
        ("train.py", ["--keep-checkpoints", "0"], "argument --keep-checkpoints: '0': must be"),
        ("evaluate.py", ["--threshold", "1.5"], "argument --threshold: '1.5': must be in (0, 1)"),
        ("evaluate.py", ["--threshold", "nan"], "argument --threshold: 'nan' is not a finite"),
        ("evaluate.py", ["--normalization", "0.3,0"], "argument --normalization: '0': must be > 0"),
        ("predict.py", ["--normalization", "0.3,nan"], "argument --normalization: 'nan' is not"),
        ("predict.py", ["--normalization", "0.3"], "argument --normalization: '0.3': expected"),
        (
            "-m cheapnet_jax.cli.export",
            ["--image-size", "50"],
            "argument --image-size: '50': must be",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tool, args, message, tmp_path):
    required = {
        "predict.py": ["--checkpoint", "x.pkl", "--out", str(tmp_path / "out"), str(tmp_path)],
        "-m cheapnet_jax.cli.export": ["--checkpoint", "x.pkl", "--format", "onnx", "--out", "m"],
    }.get(tool, ["--workdir", str(tmp_path / "run")] if tool == "train.py" else [])
    result = run_tool(tool, *required, *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == []  # nothing was written


def test_compiled_batch_size_is_the_next_power_of_two_within_the_batch():
    assert [compiled_batch_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [compiled_batch_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(small_config(workdir, epochs=1))
    return workdir


def png_claiming_size(path, width: int, height: int) -> None:
    """A PNG whose header promises width x height (a decompression bomb for Pillow)."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[12:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(raw))


def test_one_bad_file_of_any_kind_does_not_stop_the_folder(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    good = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    Image.fromarray(good).save(images / "a-good.png")
    os.mkfifo(images / "b-pipe.png")  # reading it would block forever
    png_claiming_size(images / "c-bomb.png", 40_000, 40_000)
    odd_name = os.fsencode(images) + b"/d-not-utf8-\xff.png"
    Image.fromarray(good).save(odd_name.decode(errors="surrogateescape"))
    out = tmp_path / "out"
    result = run_tool(
        "predict.py", "--checkpoint", str(trained), str(images), "--out", str(out),
        "--no-progress", "--no-overlays", timeout=300,
    )  # fmt: skip
    assert result.returncode == 1  # some files failed
    assert "b-pipe.png: not a regular file" in result.stderr
    assert "c-bomb.png: larger than Pillow allows" in result.stderr
    records = json.loads((out / "defects.json").read_text())
    verdicts = {os.path.basename(r["file"]): r.get("verdict", "ERROR") for r in records}
    assert verdicts["a-good.png"] in ("OK", "NG") and verdicts["d-not-utf8-\udcff.png"] in (
        "OK",
        "NG",
    )
    assert verdicts["b-pipe.png"] == verdicts["c-bomb.png"] == "ERROR"
    # The CSV names the odd file byte for byte.
    assert b"d-not-utf8-\xff.png" in (out / "defects.csv").read_bytes()


def test_a_second_run_on_a_folder_in_use_is_refused_and_loses_nothing(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    first = run_tool(
        "predict.py", "--checkpoint", str(trained), str(images), "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    records = (out / "defects.jsonl").read_bytes()
    with exclusive_lock(out, "test"):  # as if another predict.py were running on it
        second = run_tool(
            "predict.py", "--checkpoint", str(trained), str(images), "--out", str(out),
            "--no-progress",
        )  # fmt: skip
    assert second.returncode == 1
    assert f"error: {out}: another predict.py run is using this folder" in second.stderr
    assert (out / "defects.jsonl").read_bytes() == records

    with exclusive_lock(trained, "test"):
        training = run_tool("train.py", "--workdir", str(trained), "--epochs", "2")
    assert training.returncode == 1
    assert f"error: {trained}: another training run is using this folder" in training.stderr


def test_resume_knows_a_file_however_its_path_is_typed(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / name)
    out = tmp_path / "out"
    first = run_tool(
        "predict.py", "--checkpoint", str(trained), "images", "--out", "out", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "defects.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = run_tool(
        "predict.py", "--checkpoint", str(trained), "../images//", "--out", str(out),
        "--resume", "--no-progress", cwd=elsewhere,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "0 images predicted, 0 failed, 2 skipped" in again.stdout
    assert json.loads((out / "defects.json").read_text()) == before


def test_operating_system_errors_on_given_paths_are_one_line(trained, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / "a.png")
    result = run_tool(
        "predict.py", "--checkpoint", str(trained), str(images), "--out",
        str(blocker / "out"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 1
    assert f"error: {blocker / 'out'}" in result.stderr and "Traceback" not in result.stderr
    evaluated = run_tool(
        "evaluate.py", "--checkpoint", str(trained), "--json", str(blocker / "e.json"),
        "--no-progress",
    )  # fmt: skip
    assert evaluated.returncode == 1 and f"error: {blocker}" in evaluated.stderr
    assert "mIoU" in evaluated.stdout  # the figures were printed before the write failed
    missing = run_tool("evaluate.py", "--checkpoint", str(tmp_path / "none.pkl"))
    assert missing.returncode == 1 and "none.pkl: no such checkpoint file" in missing.stderr
    build = run_tool("-m datasets.dagm2007.build", "--manual-dir", str(tmp_path / "nothing"))
    assert build.returncode == 1 and "no DAGM 2007 download there" in build.stderr
    assert "Traceback" not in missing.stderr + build.stderr


def test_a_damaged_checkpoint_is_one_line_for_readers_and_for_resume(trained, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(trained, workdir)
    for data_file in (workdir / "checkpoints").rglob("model/d/*"):
        data_file.write_bytes(data_file.read_bytes()[:20])  # truncated array data
    evaluated = run_tool("evaluate.py", "--checkpoint", str(workdir), "--no-progress")
    assert evaluated.returncode == 1
    assert "cannot read this checkpoint" in evaluated.stderr and str(workdir) in evaluated.stderr
    assert "Traceback" not in evaluated.stderr and len(evaluated.stderr.splitlines()) == 1
    resumed = run_tool(
        "train.py", "--workdir", str(workdir), "--image-size", "32", "--synthetic-train", "8",
        "--synthetic-validation", "6", "--batch-size", "4", "--milestones", "1", "--epochs", "3",
        "--no-progress",
    )  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr
    assert "cannot resume from this checkpoint" in resumed.stderr
    assert "Traceback" not in resumed.stderr
