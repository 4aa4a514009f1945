"""Evaluate CheapNet on a DAGM folder: params, GFLOPs, mIoU, IoU per class, mAcc, pixel accuracy.

    python evaluate.py --checkpoint ../shared/torch-checkpoints/CheapNet_G32.pkl \
        --data ../shared/dagm-samples/Class6/Train --json out/g32.json

Without --checkpoint, an untrained model of --variant/--features is evaluated (a smoke run of
the whole pipeline). ``--data synthetic`` writes a small DAGM-like synthetic folder and uses it.
"""

from __future__ import annotations

import argparse
import sys

from cheapnet_jax.evaluation import EvaluationRequest, run_evaluation
from cheapnet_jax.model import VARIANTS


def parse_args(argv: list[str]) -> EvaluationRequest:
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
    width.add_argument("--features", type=int, help="width G (overrides --variant)")
    parser.add_argument(
        "--mean",
        type=float,
        help="normalisation mean of pixel/255 (default: the checkpoint's, "
        "else the authors' Class-6 0.348)",
    )
    parser.add_argument("--std", type=float, help="normalisation std (default: likewise, 0.278)")
    parser.add_argument("--image-size", type=int, help="synthetic data: image size")
    parser.add_argument("--threshold", type=float, default=0.5, help="defect if probability > this")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: by G)")
    parser.add_argument("--impl", choices=["auto", "lax", "fused"], default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(run_evaluation(parse_args(sys.argv[1:])))
