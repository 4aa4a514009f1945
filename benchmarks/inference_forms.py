"""The detector's network pass in its four forms: BatchNorm folded (the default) or not,
float32 (the default) or bfloat16 activations.

    .venv/bin/python benchmarks/inference_forms.py [--rounds 5] [--json out/inference_forms.json]

Random weights, 512x512 uint8 images, `network_probabilities` (folding inside the compiled
program, as the detector does); each round times the four forms in turn (medians of 10 runs),
the best round of each is kept. Ratios are to the defaults (folded, float32).
`benchmarks/device_check.py` runs the same rows on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from cheapnet_jax.bench import format_table, time_call, write_json
from cheapnet_jax.detection import network_probabilities
from cheapnet_jax.model import CheapNet, init_variables

FORMS = {  # name: (fold, dtype); the first is the default
    "folded float32": (True, "float32"),
    "unfolded float32": (False, "float32"),
    "folded bfloat16": (True, "bfloat16"),
}


def form_rows(shapes: list[tuple[str, int, int]], rounds: int, runs: int) -> list[dict]:
    """Images/s of each form for each ``(variant name, G, batch)``, best of ``rounds``."""
    rows = []
    for name, features, batch in shapes:
        model = CheapNet(features)
        variables = init_variables(model, jax.random.key(0))
        pixels = jax.random.randint(jax.random.key(1), (batch, 512, 512), 0, 256).astype(jnp.uint8)
        probabilities = functools.partial(network_probabilities, model, normalization=(0.5, 0.25))
        forms = {
            form: jax.jit(functools.partial(probabilities, fold=fold, dtype=dtype))
            for form, (fold, dtype) in FORMS.items()
        }
        best = {form: float("inf") for form in forms}
        for _ in range(rounds):
            for form, fn in forms.items():
                seconds = time_call(functools.partial(fn, variables, pixels), runs=runs).median_s
                best[form] = min(best[form], seconds)
        default = best["folded float32"]
        row = {"variant": name, "G": features, "batch": batch}
        row.update({f"{form} img/s": batch / seconds for form, seconds in best.items()})
        row["unfolded / default"] = default / best["unfolded float32"]
        row["bfloat16 / default"] = default / best["folded bfloat16"]
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="out/inference_forms.json")
    args = parser.parse_args(argv)
    shapes = [("S", 2, 1), ("S", 2, 8), ("M", 32, 1), ("M", 32, 8)]
    rows = form_rows(shapes, args.rounds, runs=10)
    print(format_table(rows, list(rows[0])))
    write_json(args.json, rows, rounds=args.rounds)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
