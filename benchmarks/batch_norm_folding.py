"""Inference with BatchNorm folded into the convolutions against the plain model.

    .venv/bin/python benchmarks/batch_norm_folding.py [--rounds 3] [--json out/folding.json]

Random weights, 512x512 float32, `inference_logits` (the detector's network pass); each round
times both forms in turn (medians of 10 runs), the best round is kept.
"""

from __future__ import annotations

import argparse
import sys

import jax

from cheapnet_jax.bench import format_table, time_call, write_json
from cheapnet_jax.model import CheapNet, fold_batch_norm, inference_logits, init_variables


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="out/folding.json")
    args = parser.parse_args(argv)
    rows = []
    for features, batch in ((2, 1), (2, 8), (32, 1), (32, 8)):
        variables = init_variables(CheapNet(features), jax.random.key(0))
        folded_variables = fold_batch_norm(variables)
        x = jax.random.normal(jax.random.key(1), (batch, 512, 512, 1))
        forms = {
            "plain": (
                jax.jit(lambda v, x, g=features: inference_logits(CheapNet(g), v, x)),
                variables,
            ),
            "folded": (
                jax.jit(lambda v, x, g=features: inference_logits(CheapNet(g, folded=True), v, x)),
                folded_variables,
            ),
        }
        best = {name: float("inf") for name in forms}
        for _ in range(args.rounds):
            for name, (fn, v) in forms.items():
                seconds = time_call(lambda fn=fn, v=v, x=x: fn(v, x), runs=10).median_s
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
