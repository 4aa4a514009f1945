"""``cheapnet-synthetic`` / ``python -m cheapnet_jax.cli.synthetic --out DIR``: write synthetic
images as a DAGM folder, or in another layout (``--layout``)."""

from __future__ import annotations

import argparse
import sys

from cheapnet_jax import cli
from cheapnet_jax.synthetic import WRITTEN_LAYOUTS, write_dagm_folder, write_layout


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "cheapnet-synthetic", "Write synthetic DAGM-like images as a DAGM folder or another layout."
    )
    add = parser.add_argument
    add("--out", required=True, help="folder to write")
    add("--layout", choices=WRITTEN_LAYOUTS, default="dagm", help="as which tool would export it")
    add("--count", type=cli.count, default=10, help="defective images")
    add("--size", type=cli.image_size, default=512, help="image size")
    add("--seed", type=int, default=0, help="what to draw")
    add("--class-id", type=int, default=0, help="first line of Labels.txt")
    add("--defect-free", type=cli.non_negative, default=0, help="images without a defect")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.layout == "dagm":
        folder = write_dagm_folder(
            args.out, args.count, args.size, args.seed, args.class_id, args.defect_free
        )
    else:
        folder = write_layout(
            args.out, args.layout, args.count, args.size, args.seed, args.defect_free
        )
    total = args.count + args.defect_free
    print(f"wrote {total} synthetic {args.size}x{args.size} images to {folder} ({args.layout})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.synthetic
    sys.exit(main())
