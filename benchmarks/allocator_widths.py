"""Memory of many widths in one process, and CheapNet-M's speed, under each host allocator setting.

    .venv/bin/python benchmarks/allocator_widths.py [--widths 8,32,64,128] [--rounds 2] \
        [--json out/allocator_widths.json]

A notebook comparing the authors' checkpoints runs them one width after another: for each G,
eager ``model.apply`` in float64 and float32 on batches of 2 at 512x512 and 3 at 256x384. Each
such sequence runs in a fresh process, once with the library's allocator setting and once with
``CHEAPNET_JAX_MALLOC=system`` (glibc's defaults), alternating over ``--rounds``; reported: the
process's peak resident memory. Beside it, in fresh processes too, CheapNet-M's compiled
program on one 512x512 image: minor page faults per call (the fewest of 20 after a warm-up) and
images per second (median of 20 calls): the speed the library's setting exists for.
Checkpoints from ``../shared/torch-checkpoints`` (random weights of the same width when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cheapnet_jax.bench import format_table, machine_description, write_json  # noqa: E402

CHECKPOINTS = ROOT.parent / "shared" / "torch-checkpoints"
SETTINGS = {"library": {}, "system": {"CHEAPNET_JAX_MALLOC": "system"}}

SEQUENCE = """
import json, resource, sys
from pathlib import Path
import cheapnet_jax
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from cheapnet_jax.model import CheapNet, init_variables
from cheapnet_jax.torch_import import load_torch_checkpoint

def network(g):
    path = Path(sys.argv[1]) / f"CheapNet_G{g}.pkl"
    if path.exists():
        return load_torch_checkpoint(path)
    model = CheapNet(g)
    return model, init_variables(model, jax.random.key(g))

for g in map(int, sys.argv[2].split(",")):
    model, variables = network(g)
    for dtype in (jnp.float64, jnp.float32):
        cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
        for shape in ((2, 512, 512, 1), (3, 256, 384, 1)):
            x = jax.random.normal(jax.random.key(0), shape, dtype)
            model.apply(cast, x, train=False).block_until_ready()
    del model, variables, cast
print(json.dumps({"allocator": cheapnet_jax.HOST_ALLOCATOR,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SPEED = """
import json, resource, statistics, time
import cheapnet_jax
import jax, jax.numpy as jnp
from cheapnet_jax.model import CheapNet, init_variables, inference_logits

model = CheapNet(32)
variables = init_variables(model, jax.random.key(0))
x = jnp.zeros((1, 512, 512, 1), jnp.float32)
run = jax.jit(lambda v, x: inference_logits(model, v, x))
for _ in range(3):
    run(variables, x).block_until_ready()
faults, seconds = [], []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    run(variables, x).block_until_ready()
    seconds.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults_per_call": min(faults), "images_per_s": 1 / statistics.median(seconds)}))
"""


def run_child(program: str, args: list[str], setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CHEAPNET_JAX_MALLOC")}
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        env={**env, **SETTINGS[setting]},
        cwd=ROOT,
    )
    if done.returncode != 0:
        # The kernel's OOM killer ends a runaway sequence: a result too ("killed").
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="8,32,64,128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    measured: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for setting in SETTINGS:
            sequence = run_child(SEQUENCE, [str(CHECKPOINTS), args.widths], setting)
            speed = run_child(SPEED, [], setting)
            measured[setting].append({**sequence, **speed})
            print(f"round {round_index + 1} {setting}: {sequence} {speed}", flush=True)

    def median(setting: str, key: str) -> float | None:
        values = [m[key] for m in measured[setting] if key in m]
        return statistics.median(values) if values else None

    rows = []
    for setting in SETTINGS:
        peak = median(setting, "peak_mib")
        rows.append(
            {
                "allocator": setting,
                "sequence_peak_gib": None if peak is None else round(peak / 1024, 2),
                "m_faults_per_call": median(setting, "faults_per_call"),
                "m_images_per_s": round(median(setting, "images_per_s") or 0, 1),
                "failed_rounds": sum("error" in m for m in measured[setting]),
            }
        )
    library, system = rows
    ratio = None
    if library["sequence_peak_gib"] and system["sequence_peak_gib"]:
        ratio = round(library["sequence_peak_gib"] / system["sequence_peak_gib"], 2)
    print(f"\nwidths {args.widths}, float64 and float32, eager apply; {args.rounds} rounds")
    print(format_table(rows, list(rows[0])))
    print(f"peak of the sequence, library / system: {ratio}")
    if args.json:
        write_json(
            args.json,
            rows,
            machine=machine_description(),
            widths=args.widths,
            rounds=args.rounds,
            peak_ratio=ratio,
            runs=measured,
        )


if __name__ == "__main__":
    main()
