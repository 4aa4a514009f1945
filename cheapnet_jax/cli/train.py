"""``train.py`` / ``cheapnet-train``: the paper's recipe, data-parallel over N devices.

    python train.py --variant M --devices 8 --data synthetic --epochs 2 --workdir runs/m

On a CPU-only machine, --devices N simulates N CPU devices. Started again on the same workdir,
it resumes where it stopped. Every default comes from `TrainConfig`: the flags' ``dest`` are
its field names, and `parse_config` builds it from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from cheapnet_jax import cli
from cheapnet_jax.augmentation import AUGMENTATIONS, augmentation_flags
from cheapnet_jax.losses import LOSSES, check_loss_name
from cheapnet_jax.model import VARIANTS
from cheapnet_jax.population import parse_axis, population_grid, train_population
from cheapnet_jax.training import (
    RECIPE_SETTINGS,
    RECIPES,
    TrainConfig,
    train_and_evaluate,
    with_recipe,
)

DEFAULTS = TrainConfig()


def loss_name(text: str) -> str:
    """``--loss``: a loss or a sum of them (`losses.check_loss_name`)."""
    try:
        check_loss_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def augment_names(text: str) -> tuple[str, ...]:
    """``--augment flip,rot90`` or ``none``."""
    names = () if text == "none" else tuple(text.split(","))
    try:
        augmentation_flags(names)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return names


def population_axis(text: str) -> tuple[str, tuple]:
    """``KEY=VALUES`` of ``--population`` (`population.parse_axis`)."""
    try:
        return parse_axis(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "train.py",
        "Train CheapNet with the paper's recipe, data-parallel over N devices.",
    )
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--variant", choices=sorted(VARIANTS), help="S, M or L (default S)")
    width.add_argument("--features", type=cli.count, help="width G (overrides --variant)")
    add = parser.add_argument
    add("--devices", type=cli.count, help="data-parallel devices (this process's)")
    add(
        "--data",
        help="a DAGM 2007 root folder; a folder of your own (plain images/ + masks/, a COCO "
        "export or JSON, LabelMe, CVAT segmentation masks, MVTec AD, KolektorSDD2: recognised "
        "from its contents); tfds:NAME/CONFIG (a prepared TFDS dataset); or 'synthetic'",
    )
    add(
        "--defect-classes",
        type=cli.class_names,
        help="the annotated classes that are defects, e.g. scratch,dent (default: all)",
    )
    add("--classes", type=cli.dagm_classes, help="DAGM classes: '6', '1,2,3' or 'all'")
    add(
        "--protocol",
        choices=["paper", "dagm"],
        help="paper: defective images only, 8:2; dagm: DAGM's Train folders with their good "
        "images, 8:2 into train and validation (synthetic data gains good images too)",
    )
    add("--epochs", type=cli.count, help="training epochs")
    add("--batch-size", type=cli.count, help="global batch size")
    add("--lr", type=cli.positive, help="Adam learning rate")
    add("--milestones", type=cli.increasing_counts, help="epochs where lr is multiplied")
    add("--gamma", type=cli.positive, help="the lr's factor at each milestone")
    add("--seed", type=int, help="data order, split and initialisation")
    add("--workdir", help="checkpoints, logs, config.json")
    add("--image-size", type=cli.image_size, help="synthetic data: H = W")
    add("--synthetic-train", type=cli.count, help="synthetic training images")
    add("--synthetic-validation", type=cli.count, help="synthetic validation images")
    add("--keep-checkpoints", type=cli.count, help="latest N kept, plus the best")
    add("--impl", choices=["auto", "lax", "fused"], help="layer implementation")
    add("--dtype", choices=["float32", "float64"], help="training precision")
    recipe = parser.add_argument_group(
        "the recipe: --recipe sets the flags below; a flag given explicitly wins"
    )
    recipe.add_argument("--recipe", choices=sorted(RECIPES), help="paper: the paper's recipe")
    recipe.add_argument(
        "--loss",
        type=loss_name,
        help=f"one of {', '.join(LOSSES)}, or a sum such as bce-logits+dice (bce-sigmoid: the "
        "authors' BCELoss(sigmoid), exactly)",
    )
    recipe.add_argument(
        "--augment",
        type=augment_names,
        help=f"on the device, comma-separated: {', '.join(AUGMENTATIONS)}; 'none'",
    )
    recipe.add_argument(
        "--crop-size", type=cli.non_negative, help="train on random crops of this side (0: none)"
    )
    recipe.add_argument(
        "--balance", type=cli.rate, help="the share of defective images in each batch (0: as drawn)"
    )
    recipe.add_argument(
        "--patience",
        type=cli.non_negative,
        help="stop after this many epochs without a better validation defect IoU (0: never)",
    )
    add("--pos-weight", type=cli.positive, help="bce-weighted: a defect pixel's weight")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add(
        "--allow-changes",
        action="store_true",
        help="resume a workdir although its run had other settings (seed, lr, ...)",
    )
    add(
        "--population",
        nargs="+",
        type=population_axis,
        metavar="KEY=VALUES",
        default=None,
        help="train a sweep in one program, a member per combination: seed=0..7, "
        "lr=0.01,0.001, loss=bce-logits,bce-sigmoid, classes=1..10, data=DIR1,DIR2; each "
        "member is an ordinary run in WORKDIR/members/NAME",
    )
    hosts = parser.add_argument_group(
        "several processes (jax.distributed): --distributed under a cluster launcher "
        "(Slurm, Open MPI, Kubernetes), or the three settings by hand"
    )
    hosts.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    hosts.add_argument("--num-processes", type=cli.count, help="number of processes")
    hosts.add_argument("--process-id", type=cli.non_negative, help="this process's index, 0..N-1")
    # the recipe's settings: None until parse_config fills in the recipe's where not given
    parser.set_defaults(**{**dataclasses.asdict(DEFAULTS), **dict.fromkeys(RECIPE_SETTINGS)})
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.variant is not None:
        args.features = VARIANTS[args.variant]
    by_hand = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in by_hand) and any(v is None for v in by_hand):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and args.process_id >= args.num_processes:
        parser.error(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    return args


def parse_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed flags describe: the recipe's settings, then the flags
    given (a recipe setting's flag is None when not given)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    explicit = {name: values.pop(name) for name in RECIPE_SETTINGS}
    explicit = {name: value for name, value in explicit.items() if value is not None}
    return with_recipe(TrainConfig(**values), values["recipe"], **explicit)


def start_processes(args: argparse.Namespace) -> None:
    """Join the other processes of a multi-process run (before JAX touches a device)."""
    import jax

    # CPU devices of several processes talk through gloo (the default has no cross-process
    # CPU collectives); accelerators use their own (NCCL on GPUs) whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is None:
        jax.distributed.initialize()  # the launcher's environment says who is who
    else:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


def simulate_cpu_devices(count: int) -> None:
    """Ask XLA for ``count`` host devices; must run before JAX starts (ignored on GPUs)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Importing jax and this package starts no backend: the device count can still be set.
    if args.devices > 1:
        simulate_cpu_devices(args.devices)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.distributed or args.coordinator is not None:
        start_processes(args)
    if args.devices > 1 and jax.default_backend() == "cpu" and jax.process_index() == 0:
        print(f"no accelerator: simulating {args.devices} CPU devices per process")
    if args.population is not None:
        grid = population_grid(args.population)
        train_population(parse_config(args), grid, allow_changes=args.allow_changes)
    else:
        train_and_evaluate(parse_config(args), allow_changes=args.allow_changes)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.train
    sys.exit(main())
