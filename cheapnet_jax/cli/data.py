"""``cheapnet-data check DIR`` / ``python -m cheapnet_jax.cli.data check DIR``: check a data
folder before training (`cheapnet_jax.data_check`); exit 1 when it holds errors."""

from __future__ import annotations

import argparse
import json
import sys

from cheapnet_jax import cli
from cheapnet_jax.data_check import check_folder
from cheapnet_jax.files import write_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("cheapnet-data", "Check a data folder before training on it.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        formatter_class=parser.formatter_class,
        help="images, defective and good counts, defect pixels; errors and warnings",
        description="Check every image and mask that train.py --data DATA would read, split as "
        "it would split them; exit 1 on errors.",
    )
    add = check.add_argument
    add("data", help="a data folder of any layout, a COCO JSON file, or a DAGM 2007 root")
    add(
        "--defect-classes",
        type=cli.class_names,
        default=(),
        help="the annotated classes that are defects, e.g. scratch,dent (default: all)",
    )
    add("--classes", type=cli.dagm_classes, default=(6,), help="a DAGM root's classes")
    add("--protocol", choices=["paper", "dagm"], default="paper", help="a DAGM root's protocol")
    add("--seed", type=int, default=0, help="the training run's seed (its split)")
    add("--json", dest="json_path", help="also write the report to this JSON file")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = check_folder(
        args.data,
        defect_classes=args.defect_classes,
        classes=args.classes,
        protocol=args.protocol,
        seed=args.seed,
    )
    print("\n".join(report.summary()))
    if args.json_path:
        write_atomic(args.json_path, json.dumps(report.as_json(), indent=2) + "\n")
    return 1 if report.errors else 0


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.data
    sys.exit(main())
