"""Find defects in new images: per-image verdicts and defects as JSON/CSV, plus overlays.

    python predict.py --checkpoint runs/demo images/ more/*.png --out out/predictions

INPUT: files, folders or globs of PNG/BMP/JPEG/TIFF images, any size. Exit status 0 when every
file was read, 1 when some could not be (they are in the JSON with an ``error``).
"""

from __future__ import annotations

import argparse
import sys

from cheapnet_jax import cli
from cheapnet_jax.data import CLASS6_MEAN, CLASS6_STD, DECODE_THREADS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    parser.add_argument("--checkpoint", required=True, help="authors' .pkl or a training workdir")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--threshold", type=cli.probability, default=0.5, help="defect if probability > it"
    )
    parser.add_argument(
        "--min-area", type=cli.non_negative, default=0, help="drop smaller defects (pixels)"
    )
    parser.add_argument("--batch-size", type=cli.count, default=8)
    parser.add_argument(
        "--decode-threads",
        type=cli.count,
        default=DECODE_THREADS,
        help=f"threads decoding images ahead (default {DECODE_THREADS})",
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    parser.add_argument(
        "--normalization",
        type=cli.normalization,
        help="mean,std of pixel/255 (default: the checkpoint's own; authors' .pkl: "
        f"{CLASS6_MEAN},{CLASS6_STD})",
    )
    parser.add_argument("--resume", action="store_true", help="skip images already recorded")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--impl", choices=["auto", "lax", "fused"], default="auto")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from cheapnet_jax.checkpoints import Normalization, load_checkpoint
    from cheapnet_jax.prediction import PredictOptions, find_images, predict_files

    loaded = load_checkpoint(args.checkpoint, args.impl)
    normalization = loaded.normalization or Normalization()
    if args.normalization:
        normalization = Normalization(*args.normalization)
    paths = find_images(args.inputs)
    options = PredictOptions(
        threshold=args.threshold,
        min_area=args.min_area,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        overlays=not args.no_overlays,
        resume=args.resume,
        progress=not args.no_progress,
    )
    counts = predict_files(loaded, paths, args.out, normalization, options)
    print(
        f"{counts['images']} images predicted, {counts['failed']} failed, "
        f"{counts['skipped']} skipped (already done); results in {args.out}/defects.json"
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
