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
from conftest import REPO_ROOT, cli_env, free_port, run_tool, small_config
from test_multidevice import FLOAT64_RUN, assert_same_variables, variables_of

from cheapnet_jax import data, tfds_data
from cheapnet_jax.checkpoints import load_checkpoint
from cheapnet_jax.errors import DataError
from cheapnet_jax.synthetic import write_dagm_folder
from cheapnet_jax.training import train_and_evaluate

pytest.importorskip("tensorflow_datasets")
from datasets.dagm2007.build import build as build_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """DAGM-layout Class6 built as a TFDS dataset: Train 14 defective + 6 good (the dagm
    protocol's 16 training and 4 validation images: two global batches of 8), Test 6 + 3."""
    root = tmp_path_factory.mktemp("tfds")
    for seed, (part, count, good) in enumerate((("Train", 14, 6), ("Test", 6, 3))):
        write_dagm_folder(
            root / "manual" / "Class6" / part, count=count, size=32, seed=seed, class_id=6,
            defect_free=good,
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
    """The dagm protocol on the dataset's dagm_train split (20 examples: 16 train, 4
    validation), one epoch in small_config's batches of 4 (the training program of the other
    float32 small_config runs, compiled once for the session); the normalisation is that of
    the 16 training images."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    config = small_config(tmp_path / "run", data="tfds:dagm2007/class6", protocol="dagm", epochs=1)
    figures = train_and_evaluate(config)
    assert 0 <= figures["validation"]["miou"] <= 1
    train, validation = tfds_data.training_splits(config.data, "dagm", config.seed)
    assert (len(train), len(validation)) == (16, 4)
    pixels = train.images[np.arange(16)].astype(np.float64) / 255
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


# Runs train.py's main in a process that records what `data.host_share` hands this process.
RECORDING_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from cheapnet_jax import data
from cheapnet_jax.cli import train
original = data.host_share
def recording(indices, *args):
    share = original(indices, *args)
    with open(sys.argv[2], "a") as log:
        log.write(json.dumps({"process": jax.process_index(), "batch": indices.tolist(),
                              "share": share.tolist()}) + "\\n")
    return share
data.host_share = recording
sys.exit(train.main(sys.argv[3:]))
"""


def test_two_processes_train_on_a_tfds_dataset_as_one_process_with_eight_devices(
    prepared, monkeypatch, tmp_path
):
    """train.py on the dataset (dagm protocol: 16 training and 4 validation examples, global
    batches of 8, 2 epochs, float64) as two jax.distributed processes with four devices each
    (gloo on 127.0.0.1), each process reading only its half of every global batch from the
    records: one run's files, the same weights as one process with eight devices (to 1e-9),
    evaluated by evaluate.py. The shapes and layers of test_multidevice's float64 TINY_RUN, so
    the one-process run's program is the one its eight-device runs compile."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared / "data"))
    run = (
        "--variant", "S", "--data", "tfds:dagm2007/class6", "--protocol", "dagm",
        "--batch-size", "8", "--epochs", "2", "--milestones", "1", *FLOAT64_RUN, "--no-progress",
    )  # fmt: skip
    single = tmp_path / "single"
    result = run_tool("train.py", *run, "--devices", "8", "--workdir", str(single))
    assert result.returncode == 0, result.stderr

    workdir, port = tmp_path / "two-processes", free_port()
    processes = []
    for process_id in (0, 1):
        command = [
            sys.executable, "-c", RECORDING_DRIVER, str(REPO_ROOT),
            str(tmp_path / f"shares-{process_id}.jsonl"), *run, "--devices", "4",
            "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(process_id),
        ]  # fmt: skip
        # Files, not pipes: a pipe nobody reads yet would block that process mid-run.
        stdout = (tmp_path / f"stdout-{process_id}").open("w")
        stderr = (tmp_path / f"stderr-{process_id}").open("w")
        processes.append(
            subprocess.Popen(command, cwd=REPO_ROOT, env=cli_env(), stdout=stdout, stderr=stderr)
        )
    for process_id, process in enumerate(processes):
        status = process.wait(timeout=600)
        assert status == 0, (tmp_path / f"stderr-{process_id}").read_text()[-3000:]
    outputs = [(tmp_path / f"stdout-{i}").read_text() for i in (0, 1)]
    assert "epoch 2/2" in outputs[0] and "epoch 2/2" not in outputs[1]

    # Each process read only its half of every global batch of 8 (training and validation).
    for process_id in (0, 1):
        rows = [
            json.loads(line)
            for line in (tmp_path / f"shares-{process_id}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 2 * (2 + 1)  # 2 epochs x (2 training steps + 1 validation batch)
        for row in rows:
            assert row["process"] == process_id and len(row["batch"]) == 8
            assert row["share"] == row["batch"][4 * process_id : 4 * process_id + 4]

    # One run's files: one checkpoint per epoch, one log line per epoch, no leftovers.
    steps = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
    assert steps == ["2", "4"]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2

    assert_same_variables(variables_of(workdir), variables_of(single), atol=1e-9)
    evaluated = run_tool("evaluate.py", "--checkpoint", str(workdir), "--no-progress")
    assert evaluated.returncode == 0 and "mIoU" in evaluated.stdout, evaluated.stderr
