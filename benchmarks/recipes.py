"""Which training recipe for a small, imbalanced set: test defect IoU and image AUROC of recipes
trained as populations, mean and spread over seeds.

    .venv/bin/python benchmarks/recipes.py [--seeds 4] [--epochs 60] [--sets small,full] \
        [--axes KEY=VALUES ...] [--json out/recipes.json]

The small set: 12 defective and 36 good synthetic 128x128 images across the ten texture
families, written as a plain folder and given to train.py as a user's folder would be (split
8:2 into training and validation by each member's seed). The full set: ``--data synthetic``
(64 defective and 32 good training images, dagm protocol). Each set's recipes train as one
population (``train.py --population``: loss x augment x balance x seed); every member's best
checkpoint (by validation mIoU) is evaluated by ``evaluate.py`` on the synthetic test split (40
defective and 40 good 128x128 images), at the fixed threshold 0.5. Reported per recipe: the
mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cheapnet_jax.bench import format_table, machine_description, write_json  # noqa: E402
from cheapnet_jax.synthetic import write_layout  # noqa: E402

AXES = {
    "loss": ["bce-logits", "bce-logits+dice"],
    "augment": ["none", "flip+rot90+brightness+contrast+gamma"],
    "balance": ["0", "0.5"],
}


def run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def train_and_test(
    name: str, data: list[str], axes: dict[str, list[str]], folder: Path, args
) -> dict[str, dict]:
    """Train one set's population, evaluate every member on the test folder: member -> figures."""
    workdir = folder / name
    axes = [f"{key}={','.join(values)}" for key, values in axes.items()]
    axes.append(f"seed=0..{args.seeds - 1}")
    start = time.perf_counter()
    run(
        "train.py", *data, "--batch-size", "8", "--epochs", str(args.epochs),
        "--milestones", f"{args.epochs // 2},{args.epochs * 3 // 4}",
        "--workdir", str(workdir), "--no-progress", "--population", *axes,
    )  # fmt: skip
    trained = time.perf_counter() - start
    report = folder / f"{name}-test.json"
    run(
        "evaluate.py", "--checkpoint", str(workdir), "--data", str(folder / "test"),
        "--json", str(report), "--no-progress",
    )  # fmt: skip
    print(f"{name}: trained in {trained:.0f} s", flush=True)
    return json.loads(report.read_text())["members"]


def recipe_of(member: str) -> str:
    """``loss-X_augment-Y_balance-Z_seed-N`` -> ``loss-X_augment-Y_balance-Z``."""
    return member.rsplit("_seed-", 1)[0]


def summarise(members: dict[str, dict], set_name: str) -> list[dict]:
    by_recipe: dict[str, list[dict]] = {}
    for member, figures in members.items():
        by_recipe.setdefault(recipe_of(member), []).append(figures)
    rows = []
    for recipe, runs in by_recipe.items():
        iou = [r["iou_defect"] for r in runs]
        auroc = [r["image_level"]["auroc"] for r in runs]
        rows.append(
            {
                "set": set_name,
                "recipe": recipe,
                "seeds": len(runs),
                "defect_iou_mean": round(statistics.mean(iou), 4),
                "defect_iou_sd": round(statistics.stdev(iou), 4) if len(iou) > 1 else 0.0,
                "auroc_mean": round(statistics.mean(auroc), 4),
                "auroc_sd": round(statistics.stdev(auroc), 4) if len(auroc) > 1 else 0.0,
            }
        )
    return sorted(rows, key=lambda row: -row["defect_iou_mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default="out/recipes")
    parser.add_argument("--sets", default="small,full")
    parser.add_argument(
        "--axes",
        nargs="+",
        metavar="KEY=VALUES",
        help="the recipes' axes instead of the default grid (loss, augment, balance)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    folder = Path(args.out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "test").is_dir():
        write_layout(folder / "test", "plain", count=40, size=128, seed=0, defect_free=40)
    if not (folder / "small-data").is_dir():
        write_layout(
            folder / "small-data", "plain", count=12, size=128, seed=0, defect_free=36,
            split="train",
        )  # fmt: skip
    sets = {
        "small": ["--data", str(folder / "small-data")],
        "full": ["--data", "synthetic", "--image-size", "128", "--synthetic-train", "64",
                 "--synthetic-validation", "16", "--protocol", "dagm"],
    }  # fmt: skip
    axes = AXES
    if args.axes:
        axes = dict(axis.split("=", 1) for axis in args.axes)
        axes = {key: values.split(",") for key, values in axes.items()}
    rows = []
    for name in args.sets.split(","):
        rows += summarise(train_and_test(name, sets[name], axes, folder, args), name)
    print(format_table(rows, list(rows[0])))
    if args.json:
        write_json(args.json, rows, machine=machine_description(), seeds=args.seeds,
                   epochs=args.epochs, axes=axes)  # fmt: skip


if __name__ == "__main__":
    main()
