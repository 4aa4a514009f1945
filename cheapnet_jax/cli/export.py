"""``python -m cheapnet_jax.export`` / ``cheapnet-export``: a checkpoint as ONNX, StableHLO or
the authors' torch format (see `cheapnet_jax.export`)."""

from __future__ import annotations

import argparse
import sys

from cheapnet_jax import cli
from cheapnet_jax.export import FORMATS, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "cheapnet-export",
        "Export a checkpoint for deployment: ONNX, StableHLO or the authors' format.",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="an authors' .pkl or a training workdir")
    add("--format", required=True, choices=FORMATS, help="what to write")
    add("--out", required=True, help="the file to write")
    add("--image-size", type=cli.image_size, default=512, help="H = W of the input")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = export_checkpoint(args.checkpoint, args.format, args.out, args.image_size)
    print(f"wrote {path} ({args.format}, {path.stat().st_size:,} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)
