"""predict.py and evaluate.py as a user runs them, timed side by side for two checkouts.

    .venv/bin/python benchmarks/tools.py --tree before=/tmp/old-checkout --tree after=. \
        --features 2,32 --rounds 2 --json out/tools.json

Each run is a new process of the checkout's own ``predict.py`` / ``evaluate.py`` (this
virtual environment's Python) on the real DAGM samples in ../shared repeated to ``--images``
files (else synthetic 512x512 images), with and without overlays, for each authors'
checkpoint of ``--features``; the checkouts take turns (``--rounds`` alternations), so that a
drift of the machine falls on both. Reported: the median wall time of each command and its
images/s over the whole process (start-up and compilation included: what a user waits for),
and whether every checkout wrote the same records (``defects.jsonl``) and overlays. The
rate of predict.py once started (start-up and compilation excluded) is
`benchmarks/predict_rate.py`'s.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cheapnet_jax.bench import format_table, machine_description, write_json  # noqa: E402
from cheapnet_jax.synthetic import write_dagm_folder  # noqa: E402

SHARED = ROOT.parent / "shared"
SAMPLES = SHARED / "dagm-samples" / "Class6" / "Train"
CHECKPOINTS = SHARED / "torch-checkpoints"


def input_folder(scratch: Path, count: int) -> tuple[Path, Path]:
    """``count`` images (the real samples repeated under new names, else synthetic) and a
    DAGM folder of the real samples (else synthetic) for evaluate.py."""
    images = scratch / "images"
    images.mkdir(parents=True)
    if SAMPLES.is_dir():
        sources, labelled = sorted(SAMPLES.glob("*.PNG")), SAMPLES
    else:
        labelled = write_dagm_folder(scratch / "dagm", count=10, size=512, seed=0)
        sources = sorted(labelled.glob("*.PNG"))
    for index in range(count):
        shutil.copy(sources[index % len(sources)], images / f"{index:04d}.png")
    return images, labelled


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command} in {cwd}: exit {result.returncode}\n{result.stderr}")
    return seconds


def same_outputs(a: Path, b: Path) -> bool:
    """The same records, line for line, and the same overlays, byte for byte."""
    if (a / "defects.jsonl").read_text() != (b / "defects.jsonl").read_text():
        return False
    overlays_a, overlays_b = a / "overlays", b / "overlays"
    if overlays_a.is_dir() != overlays_b.is_dir():
        return False
    if not overlays_a.is_dir():
        return True
    names = sorted(p.name for p in overlays_a.iterdir())
    if names != sorted(p.name for p in overlays_b.iterdir()):
        return False
    return all(filecmp.cmp(overlays_a / n, overlays_b / n, shallow=False) for n in names)


def checkouts(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Path]:
    """``--tree NAME=PATH`` flags: the checkouts by name (at least two)."""
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in items)}
    if len(trees) < 2:
        parser.error("--tree: give two checkouts (NAME=PATH each) to compare")
    return trees


def report(rows: list[dict], trees: dict[str, Path], what: str, json_path: str | None) -> None:
    """Print the machine and the table; write the JSON if asked."""
    machine = machine_description()
    print(f"{machine['cpu']} ({machine['cpu_vector_extensions']}), {what}")
    print(format_table(rows, list(rows[0])))
    if json_path:
        write_json(json_path, rows, trees={k: str(v) for k, v in trees.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=CHECKOUT")
    parser.add_argument("--features", default="2,32", help="authors' checkpoints, by G")
    parser.add_argument(
        "--images", default="120", help="files predict.py reads (N, or N1,N2: a row for each)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the checkouts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    trees = checkouts(parser, args.tree)
    python = sys.executable
    counts = [int(n) for n in args.images.split(",")]
    rows, seconds, outputs = [], {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folders = {n: input_folder(scratch / str(n), n) for n in counts}
        labelled = folders[counts[0]][1]
        jobs = []
        for features in [int(g) for g in args.features.split(",")]:
            checkpoint = str(CHECKPOINTS / f"CheapNet_G{features}.pkl")
            for overlays in (True, False):
                for count in counts:
                    jobs.append((f"predict.py G={features} {count} files"
                                 + ("" if overlays else " --no-overlays"),
                                 ["predict.py", "--checkpoint", checkpoint,
                                  str(folders[count][0]), "--no-progress",
                                  *([] if overlays else ["--no-overlays"])],
                                 count))  # fmt: skip
            jobs.append((f"evaluate.py G={features}",
                         ["evaluate.py", "--checkpoint", checkpoint, "--data", str(labelled),
                          "--no-progress"], 10))  # fmt: skip
        for round_index in range(args.rounds):
            order = list(trees.items())
            if round_index % 2:
                order.reverse()
            for job, command, _ in jobs:
                for name, tree in order:
                    out = scratch / f"out-{name}-{len(outputs)}"
                    extra = ["--out", str(out)] if command[0] == "predict.py" else []
                    took = timed([python, *command, *extra], tree)
                    seconds.setdefault((job, name), []).append(took)
                    if extra:
                        outputs.setdefault(job, {})[name] = out
        for job, _, count in jobs:
            row = {"command": job}
            for name in trees:
                median = statistics.median(seconds[(job, name)])
                row[f"{name} s"] = round(median, 2)
                row[f"{name} img/s"] = round(count / median, 2)
            first, *_, last = trees
            row[f"{last} / {first}"] = round(row[f"{first} s"] / row[f"{last} s"], 3)
            if job in outputs:
                written = list(outputs[job].values())
                row["same output"] = all(same_outputs(written[0], w) for w in written[1:])
            rows.append(row)
    report(rows, trees, f"{args.images} files, {args.rounds} rounds", args.json)


if __name__ == "__main__":
    main()
