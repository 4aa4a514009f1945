"""A prepared TFDS dataset in the loop: ``--data tfds:dagm2007/class6`` read with
`tfds.data_source` for evaluation (the same figures as the DAGM folder it was built from) and
training (each process reading only its share of every batch; statistics combined from
shares)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, cli_env, run_tool, small_config
from test_multidevice import assert_same_variables, free_port, variables_of

from cheapnet_jax import data, tfds_data
from cheapnet_jax.checkpoints import load_checkpoint
from cheapnet_jax.errors import DataError
from cheapnet_jax.synthetic import write_dagm_folder
from cheapnet_jax.training import train_and_evaluate

pytest.importorskip("tensorflow_datasets")
from datasets.dagm2007.build import build as build_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """DAGM-layout Class6 (Train and Test, 6 defective + 3 good each) built as a TFDS dataset."""
    root = tmp_path_factory.mktemp("tfds")
    for seed, part in enumerate(("Train", "Test")):
        write_dagm_folder(
            root / "manual" / "Class6" / part, count=6, size=32, seed=seed, class_id=6,
            defect_free=3,
        )  # fmt: skip
    build_dataset(str(root / "manual"), "class6", str(root / "data"))
    return root


class CountingSource:
    """A data source that records which examples were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(index)
        return self.source[index]


def test_a_process_reads_only_its_share(prepared, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    whole = tfds_data.open_split("dagm2007/class6", "dagm_train")
    counting = CountingSource(whole.source)
    split = tfds_data.RecordSplit(counting)
    batch = np.array([7, 2, 5, 0])
    share = data.host_share(batch, process_index=1, process_count=2)
    images, masks = split.images[share], split.masks[share]
    assert sorted(counting.read) == [0, 5]  # this process's half, each example read once
    assert images.shape == (2, 32, 32) and masks.dtype == bool
    # statistics from two processes' shares, combined, are those of the whole split
    all_images = split.images[np.arange(len(split))]
    shares = np.array_split(np.arange(len(split)), 2)
    sums = sum(tfds_data.partial_sums(split, s) for s in shares)
    mean = sums[0] / sums[2]
    expected = all_images.astype(np.float64) / 255
    assert mean == pytest.approx(expected.mean(), rel=1e-12)
    assert np.sqrt(sums[1] / sums[2] - mean**2) == pytest.approx(expected.std(), rel=1e-9)


def test_evaluate_a_tfds_split_as_its_folder(prepared, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    figures = {}
    for name, source in (
        ("tfds", "tfds:dagm2007/class6:dagm_test"),
        ("folder", str(prepared / "manual" / "Class6" / "Test")),
    ):
        result = run_tool(
            "evaluate.py", "--features", "2", "--data", source, "--no-progress", "--json",
            str(prepared / f"{name}.json"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        figures[name] = json.loads((prepared / f"{name}.json").read_text())
    for key in ("images", "confusion", "image_level", "map_component"):
        assert figures["tfds"][key] == figures["folder"][key], key
    with pytest.raises(DataError, match="tfds:dagm2007/class9:validation: not prepared in"):
        tfds_data.evaluation_split("tfds:dagm2007/class9")


def test_train_on_a_tfds_dataset(prepared, monkeypatch, tmp_path):
    """The dagm protocol on the dataset's dagm_train split (9 examples: 7 train, 2 validation),
    one epoch (one batch of small_config's 4: the training program of the other float32
    small_config runs, compiled once for the session); the normalisation is that of the 7
    training images."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    config = small_config(tmp_path / "run", data="tfds:dagm2007/class6", protocol="dagm", epochs=1)
    figures = train_and_evaluate(config)
    assert 0 <= figures["validation"]["miou"] <= 1
    train, validation = tfds_data.training_splits(config.data, "dagm", config.seed)
    assert (len(train), len(validation)) == (7, 2)
    pixels = train.images[np.arange(7)].astype(np.float64) / 255
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["data"] == "tfds:dagm2007/class6" and meta["protocol"] == "dagm"
    stored = load_checkpoint(tmp_path / "run").normalization
    assert stored.mean == pytest.approx(pixels.mean(), rel=1e-12)
    assert stored.std == pytest.approx(pixels.std(), rel=1e-9)


# One of two jax.distributed processes: normalisation statistics of a TFDS split, recording
# which examples this process read.
STATISTICS_DRIVER = """
import json, sys
repo, port, process_id, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from cheapnet_jax import tfds_data
split, _ = tfds_data.training_splits("tfds:dagm2007/class6", "paper", 0)
read = []
source = split.source
class Recording:
    def __len__(self):
        return len(source)
    def __getitem__(self, index):
        read.append(int(index))
        return source[index]
split.source = Recording()
mean, std = tfds_data.normalization_statistics(split)
json.dump({"mean": mean, "std": std, "read": sorted(set(read))}, open(out, "w"))
"""


def test_two_processes_share_the_statistics_work(prepared, monkeypatch, tmp_path):
    """Under jax.distributed (2 processes, gloo on 127.0.0.1), each process reads only its half
    of the training split, and both get the statistics of the whole split."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                STATISTICS_DRIVER,
                str(REPO_ROOT),
                str(port),
                str(i),
                str(tmp_path / f"{i}.json"),
            ],
            cwd=REPO_ROOT,
            env=cli_env(),
            stderr=(tmp_path / f"err-{i}").open("w"),
        )
        for i in (0, 1)
    ]
    for i, process in enumerate(processes):
        assert process.wait(timeout=300) == 0, (tmp_path / f"err-{i}").read_text()[-2000:]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
    train, _ = tfds_data.training_splits("tfds:dagm2007/class6", "paper", 0)
    halves = np.array_split(np.arange(len(train)), 2)
    assert [r["read"] for r in results] == [train.indices[h].tolist() for h in halves]
    pixels = train.images[np.arange(len(train))].astype(np.float64) / 255
    for result in results:
        assert result["mean"] == pytest.approx(pixels.mean(), rel=1e-12)
        assert result["std"] == pytest.approx(pixels.std(), rel=1e-9)


def test_two_processes_train_on_a_tfds_dataset_as_one_process_with_two_devices(
    prepared, monkeypatch, tmp_path
):
    """train.py on the dataset (dagm protocol: 7 training and 2 validation examples, 2 epochs,
    float64) as two jax.distributed processes with one device each, every process reading its
    half of each batch from the records: the same weights as one process with two devices."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    run = (
        "--variant", "S", "--data", "tfds:dagm2007/class6", "--protocol", "dagm",
        "--batch-size", "2", "--epochs", "2", "--milestones", "1", "--dtype", "float64",
        "--no-progress",
    )  # fmt: skip
    single = tmp_path / "single"
    result = run_tool("train.py", *run, "--devices", "2", "--workdir", str(single))
    assert result.returncode == 0, result.stderr

    workdir, port = tmp_path / "two-processes", free_port()
    processes = []
    for process_id in (0, 1):
        command = [
            sys.executable, str(REPO_ROOT / "train.py"), *run, "--devices", "1",
            "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(process_id),
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=cli_env(),
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / f"train-err-{process_id}").open("w"),
            )
        )
    for process_id, process in enumerate(processes):
        error = (tmp_path / f"train-err-{process_id}").read_text
        assert process.wait(timeout=600) == 0, error()[-3000:]
    assert_same_variables(variables_of(workdir), variables_of(single), atol=1e-9)
    evaluated = run_tool("evaluate.py", "--checkpoint", str(workdir), "--no-progress")
    assert evaluated.returncode == 0 and "mIoU" in evaluated.stdout, evaluated.stderr
