"""Image-level verdict figures: AUROC and AP against scikit-learn on known scores (ties and
one-class cases included), and evaluate.py on a folder with defect-free images against a
PyTorch reference model's maximum probabilities scored by scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool

from cheapnet_jax import load_torch_checkpoint
from cheapnet_jax.calibration import Setting
from cheapnet_jax.checkpoints import LoadedModel, Normalization
from cheapnet_jax.cli.evaluate import format_table
from cheapnet_jax.data import list_dagm_samples, normalize, read_sample
from cheapnet_jax.evaluation import evaluate_folder
from cheapnet_jax.inspection import Inspector
from cheapnet_jax.metrics import average_precision, image_level_metrics, roc_auc
from cheapnet_jax.synthetic import write_dagm_folder

sklearn_metrics = pytest.importorskip("sklearn.metrics")
torch = pytest.importorskip("torch")
from torch_reference import probabilities_nhwc, random_reference, save_reference  # noqa: E402


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_ap_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 60))
    positive = rng.random(size) < rng.uniform(0.1, 0.9)
    positive[:2] = [True, False]  # both classes
    # coarse scores: many ties, which both figures must treat as scikit-learn does
    scores = np.round(rng.random(size) + positive * rng.uniform(0, 1), 1 if seed % 2 else 3)
    assert roc_auc(scores, positive) == pytest.approx(
        sklearn_metrics.roc_auc_score(positive, scores), abs=1e-12
    )
    assert average_precision(scores, positive) == pytest.approx(
        sklearn_metrics.average_precision_score(positive, scores), abs=1e-12
    )


def test_undefined_figures_are_none():
    assert roc_auc([0.2, 0.9], [True, True]) is None
    assert average_precision([0.2, 0.9], [False, False]) is None
    only_defective = image_level_metrics([0.7, 0.2], [True, True], [True, False])
    assert only_defective["detection_rate"] == 0.5
    assert only_defective["false_alarm_rate"] is None
    assert only_defective["verdicts"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 0}


def test_evaluate_reports_image_level_figures_with_good_images(tmp_path):
    """A random-weight G=4 model on 4 defective and 6 defect-free synthetic images: scores are
    the PyTorch reference's maximum probabilities, verdicts NG when one exceeds 0.5."""
    folder = write_dagm_folder(tmp_path / "data", count=4, size=64, seed=2, defect_free=6)
    reference = random_reference(4, seed=5)
    save_reference(reference, tmp_path / "model.pkl")
    result = run_tool(
        "evaluate.py", "--checkpoint", str(tmp_path / "model.pkl"), "--data", str(folder),
        "--json", str(tmp_path / "figures.json"), "--no-progress", "--normalization", "0.4,0.3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "false alarm rate (FPR)" in result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())["image_level"]

    samples = list_dagm_samples(folder)
    images = np.stack([read_sample(s)[0] for s in samples])
    defective = np.array([s.label_path is not None for s in samples])
    scores = probabilities_nhwc(reference, normalize(images, 0.4, 0.3)).max(axis=(1, 2))
    assert np.min(np.abs(scores - 0.5)) > 1e-5  # no verdict decided by float rounding
    rejected = scores > 0.5
    assert figures["images"] == 10 and figures["good_images"] == 6
    assert figures["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(defective, scores))
    expected_ap = sklearn_metrics.average_precision_score(defective, scores)
    assert figures["ap"] == pytest.approx(expected_ap)
    assert figures["detection_rate"] == sklearn_metrics.recall_score(defective, rejected)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(defective, rejected).ravel()
    assert figures["verdicts"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    assert figures["false_alarm_rate"] == fp / (fp + tn)


def test_per_class_figures_when_several_classes_are_evaluated(tmp_path):
    """Two DAGM classes evaluated together (the API takes any list of samples): each class's
    figures are scikit-learn's on that class's images alone; the table prints a row each."""
    reference = random_reference(4, seed=5)
    save_reference(reference, tmp_path / "model.pkl")
    model, variables = load_torch_checkpoint(tmp_path / "model.pkl")
    samples = []
    for class_id, seed in ((3, 1), (6, 2)):
        folder = write_dagm_folder(
            tmp_path / f"Class{class_id}", count=3, size=32, seed=seed, class_id=class_id,
            defect_free=3,
        )  # fmt: skip
        samples += list_dagm_samples(folder)
    normalization = Setting(Normalization(0.4, 0.3), "given")
    inspector = Inspector(LoadedModel(model, variables, "random"), {"normalization": normalization})
    figures = evaluate_folder(inspector, samples, progress=False)
    images = np.stack([read_sample(s)[0] for s in samples])
    scores = probabilities_nhwc(reference, normalize(images, 0.4, 0.3)).max(axis=(1, 2))
    defective = np.array([s.label_path is not None for s in samples])
    for class_id, rows in (("3", slice(0, 6)), ("6", slice(6, 12))):
        per_class = figures["image_level_per_class"][class_id]
        assert per_class["images"] == 6
        assert per_class["auroc"] == pytest.approx(
            sklearn_metrics.roc_auc_score(defective[rows], scores[rows])
        )
    table = format_table({**figures, "params": 0, "gflops": 0, "gflops_paper": 0})
    assert "class  defective  good  TPR" in table and "\n6      3          3" in table
