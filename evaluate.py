"""Evaluate CheapNet on a DAGM folder: params, GFLOPs, mIoU, IoU per class, mAcc, pixel accuracy.

    python evaluate.py --checkpoint ../shared/torch-checkpoints/CheapNet_G32.pkl \
        --data ../shared/dagm-samples/Class6/Train --json out/g32.json

Without --checkpoint, an untrained model of --variant/--features is evaluated (a smoke run of
the whole pipeline). ``--data synthetic`` writes a small DAGM-like synthetic folder and uses it.
"""

from __future__ import annotations

import argparse
import sys

from cheapnet_jax import cli
from cheapnet_jax.evaluation import EvaluationRequest, run_evaluation
from cheapnet_jax.model import VARIANTS


def bench_request(args: argparse.Namespace) -> dict:
    """The --jit-bench settings; defaults sized for the backend (CheapNet-L is slow on a CPU)."""
    import jax

    on_cpu = jax.default_backend() == "cpu"
    if args.features is not None:
        features = [args.features]
    else:
        names = args.variants or ("S,M" if on_cpu else "S,M,L")
        features = [VARIANTS[name.strip()] for name in names.split(",")]
    batches = args.batch_sizes or ("1,8" if on_cpu else "1,64,256")
    return {
        "features": features,
        "batch_sizes": [int(b) for b in batches.split(",")],
        "image_size": args.image_size or 512,
        "runs": args.runs,
        "json_path": args.json,
    }


def parse_args(argv: list[str]) -> EvaluationRequest | dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="the authors' .pkl (or omit for an untrained model)")
    parser.add_argument(
        "--data",
        default="synthetic",
        help="a DAGM class folder (with Label/Labels.txt) or 'synthetic'",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--variant", choices=sorted(VARIANTS), default="S")
    width.add_argument("--features", type=cli.count, help="width G (overrides --variant)")
    parser.add_argument(
        "--mean",
        type=cli.finite,
        help="normalisation mean of pixel/255 (default: the checkpoint's, "
        "else the authors' Class-6 0.348)",
    )
    parser.add_argument(
        "--std", type=cli.positive, help="normalisation std (default: likewise, 0.278)"
    )
    parser.add_argument("--image-size", type=cli.image_size, help="synthetic data: image size")
    parser.add_argument(
        "--threshold", type=cli.probability, default=0.5, help="defect if probability > this"
    )
    parser.add_argument(
        "--batch-size", type=cli.count, help="images per forward pass (default: by G)"
    )
    parser.add_argument("--impl", choices=["auto", "lax", "fused"], default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench = parser.add_argument_group("--jit-bench: speed of segmentation and detection")
    bench.add_argument("--jit-bench", action="store_true", help="benchmark instead of evaluate")
    bench.add_argument("--variants", default=None, help="e.g. S,M,L (default S,M; L on GPUs)")
    bench.add_argument("--batch-sizes", default=None, help="e.g. 1,8 (default 1,8; GPU 1,64,256)")
    bench.add_argument("--runs", type=cli.count, default=20, help="timed runs per measurement")
    args = parser.parse_args(argv)
    if args.jit_bench:
        return bench_request(args)
    return EvaluationRequest(
        checkpoint=args.checkpoint,
        data_source=args.data,
        json_path=args.json,
        features=args.features if args.features is not None else VARIANTS[args.variant],
        mean=args.mean,
        std=args.std,
        threshold=args.threshold,
        batch_size=args.batch_size,
        impl=args.impl,
        image_size=args.image_size,
        progress=not args.no_progress,
    )


def main(argv: list[str]) -> int:
    request = parse_args(argv)
    if isinstance(request, dict):
        from cheapnet_jax.bench import run_jit_bench

        run_jit_bench(**request)
        return 0
    return run_evaluation(request)


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
