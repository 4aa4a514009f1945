"""The plain images/ + masks/ layout: listing and its mistakes, evaluation of images of any size
against a PyTorch reference's probabilities, and the user's flow train -> calibrate on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool
from PIL import Image

from cheapnet_jax import data, layouts
from cheapnet_jax.checkpoints import LoadedModel
from cheapnet_jax.cli.evaluate import run_validation
from cheapnet_jax.data import list_plain_samples, normalize, pad_to_multiple
from cheapnet_jax.errors import DataError
from cheapnet_jax.synthetic import make_sample, make_split, write_dagm_folder

torch = pytest.importorskip("torch")
from torch_reference import probabilities_nhwc, random_reference, save_reference  # noqa: E402


def write_plain_folder(folder, count: int, good: int, height: int, width: int, seed: int = 0):
    """``count`` defective and ``good`` defect-free synthetic images, cropped to height x width,
    as images/NAME.png and masks/NAME.png (none for good images)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    pairs = []
    side = -(-max(height, width) // 16) * 16 + 16  # synthetic samples are multiples of 16
    for index in range(count + good):
        image, mask = make_sample(rng, side, defective=index < count, family=index % 10)
        if index < count:  # keep the defect inside the crop
            rows, cols = np.nonzero(mask)
            top = min(max(rows.min() - 4, 0), side - height)
            left = min(max(cols.min() - 4, 0), side - width)
        else:
            top = left = 0
        image = image[top : top + height, left : left + width]
        mask = mask[top : top + height, left : left + width]
        Image.fromarray(image).save(folder / "images" / f"part{index:02d}.png")
        if index < count:  # masks 0 / non-zero: 7 is a defect as much as 255
            mask_file = folder / "masks" / f"part{index:02d}.png"
            Image.fromarray(mask.astype(np.uint8) * 7).save(mask_file)
        pairs.append((image, mask))
    return pairs


def test_listing_and_its_mistakes(tmp_path):
    write_plain_folder(tmp_path / "ok", count=2, good=1, height=20, width=30)
    samples = layouts.list_samples(tmp_path / "ok")
    assert [s.label_path is not None for s in samples] == [True, True, False]
    assert all(s.any_size for s in samples)

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok" / "masks" / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png: a mask without an image"):
        list_plain_samples(tmp_path / "ok")
    (tmp_path / "ok" / "masks" / "stray.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok" / "images" / "part00.bmp")
    with pytest.raises(DataError, match="two images share the stem part00"):
        list_plain_samples(tmp_path / "ok")
    (tmp_path / "neither").mkdir()
    with pytest.raises(DataError, match="not a data folder of any known layout"):
        layouts.list_samples(tmp_path / "neither")


def test_evaluate_a_plain_folder_of_any_size(tmp_path):
    """70 x 50 images (not multiples of 16): the confusion counts are those of the PyTorch
    reference's probabilities on the padded images, cropped back (pixels within 1e-4 of the
    threshold aside); good images give the image-level figures."""
    pairs = write_plain_folder(tmp_path / "data", count=3, good=2, height=70, width=50, seed=1)
    reference = random_reference(4, seed=2)
    save_reference(reference, tmp_path / "model.pkl")
    result = run_tool(
        "evaluate.py", "--checkpoint", str(tmp_path / "model.pkl"), "--data",
        str(tmp_path / "data"), "--normalization", "0.4,0.3", "--json",
        str(tmp_path / "figures.json"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    images = np.stack([pad_to_multiple(image) for image, _ in pairs])
    probabilities = probabilities_nhwc(reference, normalize(images, 0.4, 0.3))[:, :70, :50]
    masks = np.stack([mask for _, mask in pairs])
    predicted = probabilities > 0.5
    expected = {
        "tp": int(np.sum(predicted & masks)),
        "fp": int(np.sum(predicted & ~masks)),
        "fn": int(np.sum(~predicted & masks)),
        "tn": int(np.sum(~predicted & ~masks)),
    }
    uncertain = int(np.sum(np.abs(probabilities - 0.5) <= 1e-4))
    for key, value in expected.items():
        assert abs(figures["confusion"][key] - value) <= uncertain, key
    assert figures["images"] == 5
    assert figures["image_level"]["good_images"] == 2


def test_train_then_calibrate_on_a_plain_folder(tmp_path):
    write_plain_folder(tmp_path / "data", count=6, good=4, height=40, width=40, seed=3)
    trained = run_tool(
        "train.py", "--variant", "S", "--data", str(tmp_path / "data"), "--epochs", "1",
        "--batch-size", "2", "--workdir", str(tmp_path / "run"), "--no-progress", "--devices", "1",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "data")
    # calibrate on the images the run held out (8:2 of 10: 2 images), whatever their kind
    held_out = layouts.training_splits(tmp_path / "data", [], "paper", 0)[0]["validation"]
    good = sum(sample.label_path is None for sample in held_out)
    calibrated = run_tool(
        "evaluate.py", "--checkpoint", str(tmp_path / "run"), "--data", "validation",
        "--calibrate", "--no-progress",
    )  # fmt: skip
    assert (len(held_out), good) == (2, 1)  # seed 0 holds out one image of each kind
    assert calibrated.returncode == 0, calibrated.stderr
    stored = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert stored["images"] == {"defective": 1, "good": 1}
    assert stored["data"] == "validation"


def test_dagm_protocol_splits_the_train_folders_with_their_good_images(tmp_path):
    for class_id in (3, 6):
        for seed, part in enumerate(("Train", "Test")):
            write_dagm_folder(
                tmp_path / f"Class{class_id}" / part, count=6, size=32, seed=seed,
                class_id=class_id, defect_free=4,
            )  # fmt: skip
    splits = data.dagm_split(tmp_path, [3, 6], seed=1)
    every = [s.image_path for s in splits["train"] + splits["validation"]]
    expected = sorted(tmp_path.glob("Class*/Train/*.PNG"))
    assert sorted(every) == expected  # every Train image once, good ones included, no Test
    assert len(splits["validation"]) == 4  # 2 of each class's 10
    assert any(s.label_path is None for s in splits["train"])
    assert splits == data.dagm_split(tmp_path, [3, 6], seed=1)
    assert splits != data.dagm_split(tmp_path, [3, 6], seed=2)
    with pytest.raises(DataError, match=r"Class4/Train: missing"):
        data.dagm_split(tmp_path, [4])


def test_the_validation_split_of_a_synthetic_dagm_run(tmp_path):
    """--data validation re-derives what the run held out: its synthetic validation images,
    good ones included under the dagm protocol."""
    config = {
        "data": "synthetic", "synthetic_validation": 6, "image_size": 32, "seed": 4,
        "protocol": "dagm",
    }  # fmt: skip
    loaded = LoadedModel(None, {}, "run", training=config)
    folder = run_validation(loaded, tmp_path)
    samples = data.list_dagm_samples(folder)
    images, masks = make_split("validation", 6, 32, seed=4, defect_free=3)
    np.testing.assert_array_equal(np.stack([data.read_sample(s)[0] for s in samples]), images)
    assert [s.label_path is None for s in samples] == [not m.any() for m in masks]
    assert sum(s.label_path is None for s in samples) == 3
