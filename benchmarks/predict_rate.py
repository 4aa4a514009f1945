"""predict.py's rate once started: `prediction.predict_files` in process, after a warm-up run
that compiles every batch size, for checkouts side by side.

    .venv/bin/python benchmarks/predict_rate.py --tree before=/tmp/old-checkout --tree after=. \
        --features 2,32 --images 360 --rounds 2 --json out/predict_rate.json

Each measurement is a new process of this virtual environment's Python importing the
checkout's own ``cheapnet_jax`` (it reads checkouts from before the `Inspector` too, whose
``predict_files`` took the loaded model and its normalisation), on the real DAGM samples in
../shared repeated to ``--images`` files (else synthetic images), with and without overlays;
the checkouts take turns. Reported: images/s of each (the median over the rounds) and their
ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tools import CHECKPOINTS, checkouts, input_folder, report  # noqa: E402

MEASURE = """
import inspect, json, sys, tempfile, time
from pathlib import Path
tree, checkpoint, overlays, folder = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
sys.path.insert(0, tree)
from cheapnet_jax import prediction
paths = sorted(Path(folder).iterdir())
options = prediction.PredictOptions(progress=False, overlays=overlays)
if "inspector" in inspect.signature(prediction.predict_files).parameters:
    from cheapnet_jax.inspection import Inspector
    inspector = Inspector.load(checkpoint)
    run = lambda some, out: prediction.predict_files(inspector, some, out, options)
else:  # before the Inspector
    from cheapnet_jax.checkpoints import AUTHORS_NORMALIZATION, load_checkpoint
    loaded = load_checkpoint(checkpoint)
    run = lambda some, out: prediction.predict_files(
        loaded, some, out, AUTHORS_NORMALIZATION, options
    )
with tempfile.TemporaryDirectory() as scratch:
    run(paths[:24], Path(scratch) / "warm-up")  # every compiled batch size
    started = time.perf_counter()
    run(paths, Path(scratch) / "timed")
    print(json.dumps(len(paths) / (time.perf_counter() - started)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=CHECKOUT")
    parser.add_argument("--features", default="2,32", help="authors' checkpoints, by G")
    parser.add_argument("--images", type=int, default=360, help="files each timed run reads")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the checkouts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    trees = checkouts(parser, args.tree)
    rates: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        images, _ = input_folder(Path(scratch), args.images)
        for round_index in range(args.rounds):
            order = list(trees.items())[:: -1 if round_index % 2 else 1]
            for features in [int(g) for g in args.features.split(",")]:
                checkpoint = str(CHECKPOINTS / f"CheapNet_G{features}.pkl")
                for overlays in ("1", "0"):
                    for name, tree in order:
                        measured = subprocess.run(
                            [sys.executable, "-c", MEASURE, str(tree), checkpoint, overlays,
                             str(images)],
                            capture_output=True, text=True, check=True,
                        )  # fmt: skip
                        key = (features, overlays == "1", name)
                        rates.setdefault(key, []).append(json.loads(measured.stdout))
    rows = []
    for features, overlays in dict.fromkeys((k[0], k[1]) for k in rates):
        row = {"G": features, "overlays": overlays}
        for name in trees:
            row[f"{name} img/s"] = round(statistics.median(rates[(features, overlays, name)]), 2)
        first, *_, last = trees
        row[f"{last} / {first}"] = round(row[f"{last} img/s"] / row[f"{first} img/s"], 3)
        rows.append(row)
    report(rows, trees, f"{args.images} files, {args.rounds} rounds", args.json)


if __name__ == "__main__":
    main()
