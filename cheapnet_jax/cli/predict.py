"""``predict.py`` / ``cheapnet-predict``: defects of new images as JSON/CSV, plus overlays.

    python predict.py --checkpoint runs/demo images/ more/*.png --out out/predictions

INPUT: files, folders or globs of PNG/BMP/JPEG/TIFF images, any size. Exit status 0 when every
file was read, 1 when some could not be (they are in the JSON with an ``error``). Every default
comes from `InspectorOptions` and `PredictOptions`, whose field names are the flags' ``dest``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cheapnet_jax import cli, data
from cheapnet_jax.checkpoints import AUTHORS_NORMALIZATION
from cheapnet_jax.detection import INFERENCE_DTYPES
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.inspection import DEFAULT_MIN_AREA, DEFAULT_THRESHOLD, InspectorOptions
from cheapnet_jax.prediction import PredictOptions, find_images, predict_files
from cheapnet_jax.tiling import DEFAULT_TILE


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "predict.py",
        "Find defects in new images: per-image verdicts and defects as JSON/CSV, plus overlays.",
    )
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="files, folders or globs")
    add(
        "--checkpoint",
        required=True,
        help="an authors' .pkl, a training workdir, or a population workdir (then --model or "
        "--route)",
    )
    add("--model", help="a population's member to inspect the INPUTs with")
    add(
        "--route",
        dest="routes",
        action="append",
        type=cli.routed_folder,
        metavar="FOLDER=NAME",
        help="inspect the images of FOLDER with the population's member NAME; repeat for "
        "each product (the records name the member)",
    )
    add("--out", required=True, help="output folder")
    cli.add_calibrated_settings(add, DEFAULT_THRESHOLD, DEFAULT_MIN_AREA)
    add(
        "--max-components",
        type=cli.count,
        help="defects recorded per image, the first in raster order; the rest are counted "
        "(components_left_out)",
    )
    add("--batch-size", type=cli.count, help="images per forward pass")
    add("--decode-threads", type=cli.count, help="threads decoding images ahead")
    add("--no-overlays", dest="overlays", action="store_false", help="skip the overlay PNGs")
    add(
        "--normalization",
        type=cli.normalization,
        help="mean,std of pixel/255 (none: the checkpoint's own, else the authors' "
        f"{AUTHORS_NORMALIZATION.mean},{AUTHORS_NORMALIZATION.std})",
    )
    add("--resume", action="store_true", help="skip images already recorded")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add("--impl", choices=["auto", "lax", "fused"], default="auto", help="layer implementation")
    add("--dtype", choices=sorted(INFERENCE_DTYPES), help="activations between blocks")
    add(
        "--tile",
        type=cli.image_size,
        help="run every image in tiles of this size (a multiple of 16), exactly "
        f"(default: tiles of {DEFAULT_TILE} for images over --tile-above pixels)",
    )
    add("--tile-above", type=cli.non_negative, help="tile images of more pixels than this")
    add(
        "--max-image-pixels",
        type=cli.count,
        help="read images of up to this many pixels (default: Pillow's decompression-bomb "
        "limit, about 179 million)",
    )
    parser.set_defaults(**dataclasses.asdict(InspectorOptions()))
    parser.set_defaults(**dataclasses.asdict(PredictOptions()))
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_image_pixels is not None:
        data.allow_image_pixels(args.max_image_pixels)
    if args.routes and (args.inputs or args.model):
        raise SettingsError("--route FOLDER=NAME names the inputs and their members: no INPUT "
                            "or --model beside it")  # fmt: skip
    if not args.routes and not args.inputs:
        raise SettingsError("no INPUT: give files, folders or globs (or --route FOLDER=NAME)")
    inspector = cli.load_inspector(args)
    if len(inspector.models) > 1 and not args.routes:
        raise SettingsError(
            f"--checkpoint {args.checkpoint}: a population ({', '.join(inspector.models)}): "
            "inspect with one member (--model NAME), or route folders to members (--route "
            "FOLDER=NAME)"
        )
    print(cli.settings_line(inspector))
    models = None
    if args.routes:
        routed = [(path, name) for folder, name in args.routes for path in find_images([folder])]
        paths, models = [p for p, _ in routed], [n for _, n in routed]
    else:
        paths = find_images(args.inputs)
    fields = dataclasses.fields(PredictOptions)
    options = PredictOptions(**{f.name: getattr(args, f.name) for f in fields})
    counts = predict_files(inspector, paths, args.out, options, models)
    print(
        f"{counts['images']} images predicted, {counts['failed']} failed, "
        f"{counts['skipped']} skipped (already done); results in {args.out}/defects.json"
    )
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.predict
    sys.exit(main())
