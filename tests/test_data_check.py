"""cheapnet-data check: each planted fault found with its one line, the counts and fractions
against numpy's count of the masks written, exit 1 on errors; train.py refuses such a folder
before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool
from PIL import Image

from cheapnet_jax import layouts
from cheapnet_jax.data import read_mask
from cheapnet_jax.data_check import check_folder, mask_convention


def write_folder(folder, count=10, defective=6, size=(48, 64), value=255):
    """A plain folder of distinct random images; the first ``defective`` with a mask of
    rectangles of different sizes (0/``value``)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    masks = {}
    for index in range(count):
        name = f"img{index:02d}"
        Image.fromarray(rng.integers(0, 256, size, np.uint8)).save(
            folder / "images" / f"{name}.png"
        )
        if index < defective:
            mask = np.zeros(size, np.uint8)
            mask[2 : 6 + index, 3 : 10 + 2 * index] = value
            Image.fromarray(mask).save(folder / "masks" / f"{name}.png")
            masks[name] = mask > 0
    return masks


def test_counts_and_fractions_of_a_clean_folder(tmp_path):
    masks = write_folder(tmp_path / "data")
    report = check_folder(tmp_path / "data")
    assert report.errors == []
    assert (report.images, report.defective, report.good) == (10, 6, 4)
    assert dict(report.sizes) == {(48, 64): 10}
    expected = sorted(mask.mean() for mask in masks.values())
    np.testing.assert_allclose(sorted(report.defect_fractions), expected)
    assert report.warnings == ["6 0/255 masks: 255 is a defect"]


@pytest.mark.parametrize(
    ("value", "mode", "convention"),
    [(255, "L", "0/255"), (1, "L", "0/1"), (3, "P", "palette"), (7, "L", "other")],
)
def test_mask_conventions_are_named_and_read_as_non_zero(tmp_path, value, mode, convention):
    mask = np.zeros((16, 16), np.uint8)
    mask[3:7, 2:9] = value
    image = Image.fromarray(mask)
    if mode == "P":
        image = image.convert("P")
        image.putpalette([0, 0, 0] * 3 + [255, 0, 0] + [0, 0, 0] * 252)
        image = Image.fromarray(mask, "P")
        image.putpalette([0, 0, 0] * 3 + [255, 0, 0] + [0, 0, 0] * 252)
    image.save(tmp_path / "mask.png")
    assert mask_convention(tmp_path / "mask.png") == convention
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask > 0)


def test_each_planted_fault_is_one_line(tmp_path):
    folder = tmp_path / "data"
    write_folder(folder)
    splits, _ = layouts.training_splits(folder, [], "paper", 0)
    kept, copied = splits["train"][0].image_path, splits["validation"][0].image_path
    copied.write_bytes(kept.read_bytes())  # the same pixels in both splits
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(folder / "masks" / "img01.png")  # size
    Image.fromarray(np.zeros((48, 64), np.uint16)).save(folder / "images" / "img02.png")  # 16-bit
    mask = np.zeros((48, 64), np.uint8)
    mask[5:9, 5:9] = 1
    Image.fromarray(mask).save(folder / "masks" / "img03.png")  # 0/1 among 0/255

    report = check_folder(folder)
    assert sorted(report.errors) == sorted(
        [
            f"{folder / 'masks' / 'img01.png'}: label size 40x64 differs from its image "
            "img01.png (48x64)",
            f"{folder / 'images' / 'img02.png'}: image mode 'I;16' (16-bit); expected 8-bit "
            "grayscale ('L'): convert it first, e.g. PIL's Image.convert('L')",
        ]
    )
    warnings = "\n".join(report.warnings)
    assert "3 0/255 masks" in warnings and "1 0/1 masks" in warnings
    assert "masks of several conventions" in warnings
    assert "the same pixels in training and validation: " in warnings
    assert str(kept) in warnings and str(copied) in warnings

    # the CLI: every line, exit 1, the JSON report
    done = run_tool(
        "-m cheapnet_jax.cli.data", "check", str(folder), "--json", str(tmp_path / "r.json")
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 2
    assert sum(line.startswith("warning: ") for line in lines) == len(report.warnings)
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == report.errors

    # a mask without an image: the listing's one line
    (folder / "masks" / "stray.png").write_bytes((folder / "masks" / "img00.png").read_bytes())
    report = check_folder(folder)
    assert report.errors == [f"{folder / 'masks' / 'stray.png'}: a mask without an image in "
                             f"{folder / 'images'}"]  # fmt: skip


def test_no_good_images_and_a_clean_exit(tmp_path):
    write_folder(tmp_path / "data", count=4, defective=4)
    done = run_tool("-m cheapnet_jax.cli.data", "check", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert "4 images: 4 defective, 0 good" in done.stdout
    assert "warning: no good images" in done.stdout


def test_train_refuses_a_folder_with_errors_before_training(tmp_path):
    folder = tmp_path / "data"
    write_folder(folder, size=(32, 32))
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(folder / "masks" / "img04.png")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(folder / "masks" / "img05.png")
    workdir = tmp_path / "run"
    done = run_tool(
        "train.py", "--data", str(folder), "--epochs", "1", "--batch-size", "2",
        "--workdir", str(workdir), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'masks' / 'img04.png'}: label size 16x32 differs from its image "
        f"img04.png (32x32) (and 1 more: cheapnet-data check {folder})"
    )
    assert not (workdir / "checkpoints").exists()
