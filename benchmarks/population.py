"""Population training against solo runs (issue 26): P CheapNets in one program vs P programs.

    .venv/bin/python benchmarks/population.py [--members 1,4,8,16] [--sizes 64,256]
        [--features 2] [--batch-size 8] [--epochs 2] [--json out/population.json]

Two measurements per image size and population size P, CheapNet-S on synthetic data:

- **step**: the median time of one compiled population step (P members vmapped inside the pmap
  over one device, `population.parallel_population_step`) against one solo training step
  (`training.parallel_train_step`), both after warm-up. P solo runs take P solo steps for the
  population's one.
- **end to end**: the wall time of ``train.py --population seed=0..P-1`` against one solo
  ``train.py`` run with the same settings, each a new process as a user runs them (start-up,
  data, compilation, validation, checkpoints and all). P solo runs one after another take P
  times one solo run (runs that differ only in their seed take the same time; the solo run is
  timed ``--solo-repeats`` times and its median used).

"speedup" is (P solo runs) / population; "x one solo" is population / (one solo run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(
    features: int, size: int, batch: int, runs: int, members: list[int]
) -> tuple[float, dict[int, float]]:
    """Median seconds of one solo training step and of one population step of each size in
    ``members`` (seeds 0..P-1), CheapNet of width ``features`` on one device, random data.
    Also `benchmarks/device_check.py`'s population row."""
    import jax
    import numpy as np

    from cheapnet_jax import CheapNet
    from cheapnet_jax.bench import time_call
    from cheapnet_jax.population import SharedSettings, parallel_population_step, stack_members
    from cheapnet_jax.training import (
        AXIS,
        TrainConfig,
        initial_state,
        make_optimizer,
        optimizer_arguments,
        parallel_train_step,
        training_optimizer,
    )

    devices = jax.devices()[:1]
    model = CheapNet(features, bn_axis_name=AXIS)
    config = TrainConfig(features=features, batch_size=batch)
    optimizer = make_optimizer(config, 8)
    rng = np.random.default_rng(0)

    def batch_of(*members_axis: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, *members_axis, batch, size, size, 1)  # [devices, (members,) b, H, W, 1]
        return rng.standard_normal(shape).astype(np.float32), rng.random(shape) < 0.05

    solo = parallel_train_step(
        model, training_optimizer(config), devices, optimizer_args=optimizer_arguments(config, 8)
    )
    state = initial_state(config, model, optimizer)
    x, y = batch_of()
    solo_s = time_call(lambda: solo(state, x, y)[1]["loss"], runs=runs).median_s
    shared = SharedSettings(
        config.gamma, config.milestones, ("bce-logits",), config.pos_weight, False, 0
    )
    step = parallel_population_step(model, shared, devices)
    population_s = {}
    for p in members:
        stacked = stack_members(
            [initial_state(TrainConfig(seed=seed), model, optimizer) for seed in range(p)]
        )
        settings = (
            np.full(p, 0.01, np.float32),
            np.full(p, 8, np.int32),
            np.zeros(p, np.int32),
            np.ones(p, bool),
            np.zeros(p, np.int32),  # no augmentation: seeds, operations, normalisation unused
            np.zeros((p, 5), bool),
            np.zeros(p, np.float32),
            np.ones(p, np.float32),
        )
        x, y = batch_of(p)
        operands = (stacked, x, y, *settings)
        population_s[p] = time_call(
            lambda operands=operands: step(*operands)[1]["loss"], runs=runs
        ).median_s
    return solo_s, population_s


# Run in a new process with a user's environment (`_env`): prints one JSON object.
STEP_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from population import step_seconds
members = [int(p) for p in sys.argv[6].split(",")]
solo, population = step_seconds(*(int(v) for v in sys.argv[2:6]), members)
print(json.dumps({"solo": solo, "population": population}))
"""


def _comparison_row(measure: str, size: int, p: int, solo: float, population: float, unit: str):
    """One table row: population against one and against P solo runs (seconds in, shown in
    ``unit``: "ms" or "s")."""
    scale, digits = (1e3, 2) if unit == "ms" else (1.0, 1)
    return {
        "measure": measure,
        "image": size,
        "P": p,
        "one solo": f"{scale * solo:.{digits}f} {unit}",
        "P solo runs": f"{scale * p * solo:.{digits}f} {unit}",
        "population": f"{scale * population:.{digits}f} {unit}",
        "x one solo": round(population / solo, 2),
        "speedup": round(p * solo / population, 2),
    }


def _step_rows(args, size: int) -> list[dict]:
    command = [sys.executable, "-c", STEP_WORKER, str(ROOT / "benchmarks"), str(args.features)]
    command += [str(size), str(args.batch_size), str(args.runs), args.members]
    output = subprocess.run(
        command, env=_env(), cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(output.strip().splitlines()[-1])
    return [
        _comparison_row("step", size, int(p), found["solo"], population, "ms")
        for p, population in found["population"].items()
    ]


def _env() -> dict[str, str]:
    """A user's shell: one CPU device, no inherited XLA flags or compilation cache."""
    drop = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    return {key: value for key, value in os.environ.items() if key not in drop}


def _train_seconds(args, size: int, workdir: Path, extra: list[str]) -> float:
    command = [sys.executable, str(ROOT / "train.py"), "--data", "synthetic", "--no-progress"]
    command += ["--features", str(args.features), "--image-size", str(size)]
    command += ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    command += ["--workdir", str(workdir), *extra]
    start = time.perf_counter()
    subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def _end_to_end_rows(args, size: int, scratch: Path) -> list[dict]:
    solo = statistics.median(
        _train_seconds(args, size, scratch / f"solo-{size}-{repeat}", [])
        for repeat in range(args.solo_repeats)
    )
    rows = []
    for p in (int(v) for v in args.members.split(",")):
        population = _train_seconds(
            args, size, scratch / f"population-{size}-{p}", ["--population", f"seed=0..{p - 1}"]
        )
        measure = f"end to end, {args.epochs} epochs"
        rows.append(_comparison_row(measure, size, p, solo, population, "s"))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", default="1,4,8,16", help="population sizes P")
    parser.add_argument("--sizes", default="64,256", help="synthetic image sizes")
    parser.add_argument("--features", type=int, default=2, help="width G (default: S)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the end-to-end runs")
    parser.add_argument("--runs", type=int, default=10, help="timed steps per figure")
    parser.add_argument("--solo-repeats", type=int, default=2)
    parser.add_argument("--no-end-to-end", action="store_true", help="step timings only")
    parser.add_argument("--json", default="out/population.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from cheapnet_jax.bench import format_table, machine_description, write_json

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in (int(v) for v in args.sizes.split(",")):
            rows += _step_rows(args, size)
            if not args.no_end_to_end:
                rows += _end_to_end_rows(args, size, Path(scratch))
            print(format_table(rows, list(rows[0])), flush=True)
    machine = machine_description()
    print(f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, {machine['date']}")
    write_json(args.json, rows, machine=machine, settings=vars(args))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
