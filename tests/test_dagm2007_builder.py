"""The DAGM 2007 tensorflow-datasets builder, built on generated DAGM-layout folders and on the
real samples in ../shared, read back with `as_data_source` (no TensorFlow involved).

These build the dataset as users do (array_record) and compare every example with its source
files; TFDS's own `DatasetBuilderTestCase` runs on the committed dummy data in
test_dagm2007_tfds.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cheapnet_jax.errors import DataError
from cheapnet_jax.synthetic import write_dagm_folder
from datasets.dagm2007.build import build as build_dataset
from datasets.dagm2007.build import main as build_main


def build(manual_dir, data_dir, config):
    return build_dataset(str(manual_dir), config, str(data_dir)).as_data_source()


@pytest.fixture
def manual_dir(tmp_path):
    root = tmp_path / "manual"
    for class_id in (3, 6):
        for seed, part in enumerate(("Train", "Test")):
            folder = write_dagm_folder(
                root / f"Class{class_id}" / part, count=5, size=32, seed=seed, class_id=class_id
            )
            Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "0099.PNG")
            labels = folder / "Label" / "Labels.txt"  # one defect-free image per folder
            labels.write_text(labels.read_text() + "99\t0\t0099.PNG\t0\t0\n")
    return root


def test_class_config_splits_and_contents(manual_dir, tmp_path):
    source = build(manual_dir, tmp_path / "data", "class6")
    assert {name: len(split) for name, split in source.items()} == {
        "train": 8,
        "validation": 2,
        "dagm_train": 6,
        "dagm_test": 6,
    }
    names = {ex["file_name"] for split in ("train", "validation") for ex in source[split]}
    assert len(names) == 10  # the paper split: every defective image exactly once
    for example in source["dagm_train"]:
        _, _, image_name = example["file_name"].decode().split("/")
        folder = manual_dir / "Class6" / "Train"
        np.testing.assert_array_equal(example["image"], np.asarray(Image.open(folder / image_name)))
        assert example["class_id"] == 6
        if example["defective"]:
            label_name = image_name.replace(".PNG", "_label.PNG")
            label = np.asarray(Image.open(folder / "Label" / label_name))
            np.testing.assert_array_equal(example["mask"], (label > 0).astype(np.uint8))
    assert sum(not ex["defective"] and not ex["mask"].any() for ex in source["dagm_test"]) == 1


def test_all_config_takes_every_class(manual_dir, tmp_path):
    # classes 3 and 6 exist: absent classes are named, not skipped silently
    with pytest.raises(DataError, match=r"Class1: missing: put the DAGM 2007 download there"):
        build(manual_dir, tmp_path / "data", "all")


def test_missing_manual_dir_says_where_to_put_the_files(tmp_path):
    with pytest.raises(Exception, match="manual"):
        build(tmp_path / "nothing", tmp_path / "data", "class6")


def test_real_samples(samples_folder, tmp_path):
    manual = samples_folder.parents[1]  # .../dagm-samples, holding Class6/Train
    source = build(manual, tmp_path / "data", "class6")
    assert len(source["train"]) == 8 and len(source["validation"]) == 2
    assert len(source["dagm_train"]) == 10 and "dagm_test" not in source  # no Test/ there
    example = source["train"][0]
    assert example["image"].shape == (512, 512) and example["mask"].any()


def test_build_command(manual_dir, tmp_path, capsys):
    argv = ["--manual-dir", str(manual_dir), "--config", "class3", "--data-dir", str(tmp_path)]
    assert build_main(argv) == 0
    assert "built dagm2007/class3/1.0.0" in capsys.readouterr().out
    assert (tmp_path / "dagm2007" / "class3" / "1.0.0").is_dir()
