"""predict.py end to end: good, corrupt and RGB images; JSON/CSV against scipy's labels of the
network's own mask; overlays; exit status; resume."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, checkpoint_path
from PIL import Image
from scipy import ndimage

from cheapnet_jax import load_torch_checkpoint
from cheapnet_jax.data import normalize
from cheapnet_jax.prediction import pad_to_multiple


@pytest.fixture
def inputs(tmp_path, samples_folder):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("1070.PNG", "1084.PNG", "1124.PNG"):
        shutil.copy(samples_folder / name, folder / name)
    (folder / "broken.png").write_bytes((samples_folder / "1112.PNG").read_bytes()[:300])
    crop = np.asarray(Image.open(samples_folder / "1115.PNG"))[:500, :450]  # not a multiple of 16
    Image.fromarray(np.stack([crop] * 3, axis=-1)).save(folder / "colour.png")
    return folder


def run_predict(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "predict.py"), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def expected_defects(image: np.ndarray) -> list[list[int]]:
    """Boxes and areas by scipy on the mask of the network run directly (padded, cropped)."""
    model, variables = load_torch_checkpoint(checkpoint_path(2))
    x = normalize(pad_to_multiple(image)[None])
    probabilities = np.asarray(jax.nn.sigmoid(model.apply(variables, x)))[0, ..., 0]
    mask = probabilities[: image.shape[0], : image.shape[1]] > 0.5
    labels, count = ndimage.label(mask, np.ones((3, 3)))
    areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    return [
        [cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(area)]
        for (rows, cols), area in zip(ndimage.find_objects(labels), areas, strict=True)
    ]


def test_predict_folder_end_to_end(inputs, tmp_path):
    out = tmp_path / "out"
    result = run_predict(
        "--checkpoint",
        str(checkpoint_path(2)),
        str(inputs),
        "--out",
        str(out),
        "--decode-threads",
        "3",
    )
    assert result.returncode == 1, result.stderr  # one file failed
    assert "broken.png: cannot decode image" in result.stderr
    records = {file_name(r["file"]): r for r in json.loads((out / "defects.json").read_text())}
    assert set(records) == {"1070.PNG", "1084.PNG", "1124.PNG", "broken.png", "colour.png"}
    assert "error" in records["broken.png"]
    assert records["colour.png"]["warning"].startswith("converted from mode 'RGB'")
    assert (records["colour.png"]["width"], records["colour.png"]["height"]) == (450, 500)
    for name in ("1070.PNG", "1084.PNG", "colour.png"):
        image = np.asarray(Image.open(inputs / name).convert("L"))
        found = [[*d["box"], d["area"]] for d in records[name]["defects"]]
        assert found == expected_defects(image), name
        assert records[name]["verdict"] == ("NG" if found else "OK")
        assert (out / records[name]["overlay"]).is_file()
    with (out / "defects.csv").open() as file:
        rows = list(csv.DictReader(file))
    defect_rows = sum(max(len(r.get("defects", [])), 1) for r in records.values())
    assert len(rows) == defect_rows


def file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_resume_skips_finished_images(inputs, tmp_path):
    out = tmp_path / "out"
    checkpoint = str(checkpoint_path(2))
    first = run_predict("--checkpoint", checkpoint, str(inputs), "--out", str(out), "--no-overlays")
    assert first.returncode == 1
    lines = (out / "defects.jsonl").read_text().splitlines()
    # a run killed halfway: two records kept, the third cut in the middle of its line
    (out / "defects.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    (inputs / "broken.png").unlink()
    again = run_predict(
        "--checkpoint", checkpoint, str(inputs), "--out", str(out), "--no-overlays", "--resume"
    )
    assert again.returncode == 0, again.stderr
    kept = {json.loads(line)["file"] for line in lines[:2]} - {str(inputs / "broken.png")}
    assert f"{len(kept)} skipped" in again.stdout
    records = json.loads((out / "defects.json").read_text())
    files = {r["file"] for r in records if "error" not in r}
    assert files == {str(p) for p in inputs.iterdir()}


def test_thread_and_batch_counts_must_be_positive(tmp_path):
    result = run_predict(
        "--checkpoint", "x.pkl", str(tmp_path), "--out", str(tmp_path), "--decode-threads", "0"
    )
    assert result.returncode == 2 and "--decode-threads must be >= 1, got 0" in result.stderr
