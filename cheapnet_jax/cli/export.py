"""``python -m cheapnet_jax.cli.export`` / ``cheapnet-export``: a checkpoint as ONNX, StableHLO or
the authors' torch format, or the whole detector (uint8 images -> defects) as one StableHLO
artifact with ``--pipeline`` (see `cheapnet_jax.export`).

    python -m cheapnet_jax.cli.export --checkpoint runs/demo --format stablehlo --pipeline \
        --image-size 512 --threshold 0.5 --min-area 10 --out cheapnet.pipeline.stablehlo

Exit status 0; 1 when the pipeline artifact gives other defects than the JAX pipeline on the
parity images (the artifact and its report are written either way).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cheapnet_jax import cli
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.export import FORMATS, export_checkpoint, export_pipeline, parity_path


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "cheapnet-export",
        "Export a checkpoint for deployment: ONNX, StableHLO or the authors' format.",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="an authors' .pkl or a training workdir")
    add("--format", required=True, choices=FORMATS, help="what to write")
    add("--out", required=True, help="the file to write")
    add(
        "--image-size",
        default="512",
        help="H = W of the input (a multiple of 16); with --pipeline any N or HxW",
    )
    pipeline = parser.add_argument_group("--pipeline: the detector, images to defects")
    add = pipeline.add_argument
    add("--pipeline", action="store_true", help="export the whole detector (stablehlo only)")
    cli.add_calibrated_settings(add, threshold=0.5, min_area=0)
    add("--max-components", type=cli.count, default=256, help="defects reported per image")
    add(
        "--normalization",
        type=cli.normalization,
        help="mean,std of pixel/255 (none: the checkpoint's own, else the authors')",
    )
    add(
        "--platforms",
        type=lambda text: tuple(p.strip() for p in text.split(",") if p.strip()),
        help="where the artifact will run, e.g. cpu,cuda (default: this machine's backend)",
    )
    add("--parity-images", nargs="+", default=[], help="images (HxW) to check the artifact on")
    parser.set_defaults(impl="auto")
    return parser


def _image_size(parser: argparse.ArgumentParser, text: str, check: Callable):
    """--image-size checked by ``check`` (it depends on --pipeline), argparse's way on error."""
    try:
        return check(text)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --image-size: {err}")


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.pipeline:
        size = _image_size(parser, args.image_size, cli.image_size)
        path = export_checkpoint(args.checkpoint, args.format, args.out, size)
        print(f"wrote {path} ({args.format}, {path.stat().st_size:,} bytes)")
        return 0
    if args.format != "stablehlo":
        raise SettingsError(f"--pipeline exports StableHLO only, not --format {args.format}")
    height, width = _image_size(parser, args.image_size, cli.image_shape)
    inspector = cli.load_inspector(args)
    if len(inspector.models) > 1:
        raise SettingsError(
            f"--checkpoint {args.checkpoint}: a population ({', '.join(inspector.models)}): "
            "export one member's folder (members/NAME)"
        )
    print(cli.settings_line(inspector))
    path, report = export_pipeline(
        inspector,
        args.out,
        height,
        width,
        platforms=args.platforms,
        parity_paths=args.parity_images,
    )
    print(f"wrote {path} (pipeline for {height}x{width} uint8, {path.stat().st_size:,} bytes)")
    if report["all_same_defects"] is None:
        print(f"parity not checked: this machine runs none of {', '.join(report['platforms'])}")
        return 0
    same = sum(r["same_defects"] for r in report["images"])
    worst = max(r["max_score_difference"] for r in report["images"])
    print(
        f"parity with the JAX pipeline: {same}/{len(report['images'])} images with the same "
        f"defects, scores within {worst:.2g}; report in {parity_path(path)}"
    )
    return 0 if report["all_same_defects"] else 1


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.export
    sys.exit(main())
