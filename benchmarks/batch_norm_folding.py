"""Inference with BatchNorm folded into the convolutions against the plain model.

    .venv/bin/python benchmarks/batch_norm_folding.py [--rounds 3] [--json out/folding.json]

Random weights, 512x512 uint8 images, the detector's network pass (`network_probabilities`,
folding inside the compiled program with ``fold=True``, its default, or not); each round times
both forms in turn (medians of 10 runs), the best round is kept.
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="out/folding.json")
    args = parser.parse_args(argv)
    rows = []
    for features, batch in ((2, 1), (2, 8), (32, 1), (32, 8)):
        model = CheapNet(features)
        variables = init_variables(model, jax.random.key(0))
        pixels = jax.random.randint(jax.random.key(1), (batch, 512, 512), 0, 256).astype(jnp.uint8)
        probabilities = functools.partial(network_probabilities, normalization=(0.5, 0.25))
        forms = {
            name: jax.jit(functools.partial(probabilities, model, fold=fold))
            for name, fold in (("plain", False), ("folded", True))
        }
        best = {name: float("inf") for name in forms}
        for _ in range(args.rounds):
            for name, fn in forms.items():
                seconds = time_call(functools.partial(fn, variables, pixels), runs=10).median_s
                best[name] = min(best[name], seconds)
        rows.append(
            {
                "G": features,
                "batch": batch,
                "plain img/s": batch / best["plain"],
                "folded img/s": batch / best["folded"],
                "folded / plain": best["plain"] / best["folded"],
            }
        )
        print(rows[-1], file=sys.stderr)
    print(format_table(rows, list(rows[0])))
    write_json(args.json, rows, rounds=args.rounds)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
