"""Threshold calibration: components measured on known maps, the chosen operating point against a
brute-force search scored by scikit-learn, refusals, and the flow a user runs: evaluate.py
--calibrate stores it beside the checkpoint and predict.py uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool

from cheapnet_jax.calibration import (
    THRESHOLDS,
    CalibrationData,
    calibrate,
    largest_component_areas,
)
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.synthetic import write_dagm_folder

sklearn_metrics = pytest.importorskip("sklearn.metrics")
torch = pytest.importorskip("torch")
from torch_reference import random_reference, save_reference  # noqa: E402


def test_largest_component_areas_of_a_known_map():
    probabilities = np.zeros((20, 20), np.float32)
    probabilities[2:4, 2:7] = 0.91  # 10 pixels
    probabilities[10:15, 10:16] = 0.31  # 30 pixels
    probabilities[15, 16] = 0.31  # touches the block diagonally: 31 with 8-connectivity
    areas = largest_component_areas(probabilities)
    assert areas[THRESHOLDS < 0.31].tolist() == [31] * int(np.sum(THRESHOLDS < 0.31))
    assert set(areas[(THRESHOLDS > 0.31) & (THRESHOLDS < 0.91)]) == {10}
    assert set(areas[THRESHOLDS > 0.91]) == {0}


def _brute_force(largest, defective):
    """Every threshold of the grid and every integer minimum area, scored by scikit-learn."""
    scored = {}  # many pairs give the same verdicts: score each set of verdicts once
    for t in range(len(THRESHOLDS)):
        for min_area in range(1, largest.max() + 2):
            rejected = largest[:, t] >= min_area
            if rejected.tobytes() not in scored:
                tn, fp, fn, tp = sklearn_metrics.confusion_matrix(
                    defective, rejected, labels=[False, True]
                ).ravel()
                f1 = sklearn_metrics.f1_score(defective, rejected, zero_division=0)
                scored[rejected.tobytes()] = (f1, tp / (tp + fn), fp / (fp + tn))
    return np.array(list(scored.values()))


@pytest.mark.parametrize("seed", range(4))
def test_chosen_point_is_the_best_one(seed):
    rng = np.random.default_rng(seed)
    count = 14
    defective = np.arange(count) < 8
    # defective images: larger components that shrink slowly with the threshold
    base = np.where(defective, rng.integers(5, 40, count), rng.integers(0, 12, count))
    largest = np.maximum(base[:, None] - rng.integers(0, 3, (count, len(THRESHOLDS))).cumsum(1), 0)
    data = CalibrationData(list(largest), list(defective))
    brute = _brute_force(largest, defective)

    best_f1 = calibrate(data)
    assert best_f1["f1"] == pytest.approx(brute[:, 0].max())
    at_fpr = calibrate(data, target_fpr=0.2)
    assert at_fpr["fpr"] <= 0.2
    assert at_fpr["tpr"] == pytest.approx(brute[brute[:, 2] <= 0.2, 1].max())
    at_tpr = calibrate(data, target_tpr=0.75)
    assert at_tpr["tpr"] >= 0.75
    assert at_tpr["fpr"] == pytest.approx(brute[brute[:, 1] >= 0.75, 2].min())
    # the chosen point is on the reported curve
    assert {"threshold": best_f1["threshold"], "tpr": best_f1["tpr"], "fpr": best_f1["fpr"]} in [
        {k: p[k] for k in ("threshold", "tpr", "fpr")} for p in best_f1["curve"]
    ]


def test_calibration_needs_both_kinds_of_image():
    only_defective = CalibrationData([np.ones(len(THRESHOLDS), int)] * 3, [True] * 3)
    with pytest.raises(SettingsError, match="needs defect-free images"):
        calibrate(only_defective)
    unreachable = CalibrationData(
        [np.zeros(len(THRESHOLDS), int), np.ones(len(THRESHOLDS), int)], [True, False]
    )
    with pytest.raises(SettingsError, match=r"no threshold reaches a detection rate of 1\.0"):
        calibrate(unreachable, target_tpr=1.0)


def test_evaluate_calibrates_and_predict_uses_it(tmp_path):
    reference = random_reference(2, seed=1)
    checkpoint = tmp_path / "model.pkl"
    save_reference(reference, checkpoint)
    validation = write_dagm_folder(
        tmp_path / "val", count=6, size=64, seed=3, split="validation", defect_free=6
    )
    calibrated = run_tool(
        "evaluate.py", "--checkpoint", str(checkpoint), "--data", str(validation),
        "--calibrate", "--target-fpr", "0.5", "--no-progress",
    )  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr
    stored = json.loads((tmp_path / "model.pkl.calibration.json").read_text())
    assert stored["objective"] == "fpr <= 0.5" and stored["fpr"] <= 0.5
    assert stored["images"] == {"defective": 6, "good": 6}
    for plot in ("model.pkl.calibration-roc.png", "model.pkl.calibration-pr.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"threshold {stored['threshold']}, min area {stored['min_area']}" in calibrated.stdout

    images = write_dagm_folder(tmp_path / "new", count=3, size=64, seed=9)
    by_default = run_tool(
        "predict.py", "--checkpoint", str(checkpoint), str(images), "--out",
        str(tmp_path / "a"), "--no-progress", "--no-overlays",
    )  # fmt: skip
    assert by_default.returncode == 0, by_default.stderr
    assert (
        f"using threshold {stored['threshold']} (calibration {checkpoint}.calibration.json), "
        f"min area {stored['min_area']} (calibration" in by_default.stdout
    )
    explicit = run_tool(
        "predict.py", "--checkpoint", str(checkpoint), str(images), "--out",
        str(tmp_path / "b"), "--no-progress", "--no-overlays", "--no-calibration",
        "--threshold", str(stored["threshold"]), "--min-area", str(stored["min_area"]),
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr

    def defects(folder):
        return [r["defects"] for r in json.loads((folder / "defects.json").read_text())]

    assert defects(tmp_path / "a") == defects(tmp_path / "b")

    # the pipeline artifact bakes in the calibrated settings too
    exported = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(checkpoint), "--format", "stablehlo",
        "--pipeline", "--image-size", "64", "--out", str(tmp_path / "p.stablehlo"),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert f"using threshold {stored['threshold']} (calibration" in exported.stdout
    report = json.loads((tmp_path / "p.stablehlo.parity.json").read_text())
    assert report["settings"]["threshold"] == stored["threshold"]
    assert report["settings"]["min_area"] == stored["min_area"]


def test_calibration_without_good_images_is_one_line_and_writes_nothing(tmp_path):
    save_reference(random_reference(2, seed=1), tmp_path / "model.pkl")
    folder = write_dagm_folder(tmp_path / "val", count=2, size=32, seed=3)
    result = run_tool(
        "evaluate.py", "--checkpoint", str(tmp_path / "model.pkl"), "--data", str(folder),
        "--calibrate", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: calibration needs defect-free images: without them the false alarm rate is "
        "undefined (this data has only defective images)"
    ]
    assert not list(tmp_path.glob("model.pkl.calibration*"))
