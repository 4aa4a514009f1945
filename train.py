"""Train CheapNet with the paper's recipe, data-parallel over N devices.

    python train.py --variant M --devices 8 --data synthetic --epochs 2 --workdir runs/m

On a CPU-only machine, --devices N simulates N CPU devices. Started again on the same workdir,
it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

from cheapnet_jax import cli  # starts no JAX backend: XLA_FLAGS can still be set after it
from cheapnet_jax.model import VARIANTS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--variant", choices=sorted(VARIANTS), default="S")
    width.add_argument("--features", type=cli.count, help="width G (overrides --variant)")
    parser.add_argument("--devices", type=cli.count, default=1, help="data-parallel devices")
    parser.add_argument("--data", default="synthetic", help="DAGM 2007 root folder or 'synthetic'")
    parser.add_argument(
        "--classes", type=dagm_classes, default="6", help="DAGM classes: '6', '1,2,3' or 'all'"
    )
    parser.add_argument("--epochs", type=cli.count, default=120)
    parser.add_argument("--batch-size", type=cli.count, default=8, help="global batch size")
    parser.add_argument("--lr", type=cli.positive, default=0.01)
    parser.add_argument(
        "--milestones",
        type=cli.increasing_counts,
        default="60,90",
        help="epochs where lr is multiplied",
    )
    parser.add_argument("--gamma", type=cli.positive, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument(
        "--image-size", type=cli.image_size, default=512, help="synthetic data only"
    )
    parser.add_argument("--synthetic-train", type=cli.count, default=64, help="synthetic images")
    parser.add_argument("--synthetic-validation", type=cli.count, default=16)
    parser.add_argument(
        "--keep-checkpoints", type=cli.count, default=3, help="latest N kept (>= 1)"
    )
    parser.add_argument("--impl", choices=["auto", "lax", "fused"], default="auto")
    parser.add_argument(
        "--loss",
        choices=["bce-logits", "bce-sigmoid"],
        default="bce-logits",
        help="BCE on logits, or the authors' BCELoss(sigmoid) with its saturation",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="training precision"
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume a workdir although its run had other settings (seed, lr, ...)",
    )
    hosts = parser.add_argument_group(
        "several processes (jax.distributed): --distributed under a cluster launcher "
        "(Slurm, Open MPI, Kubernetes), or the three settings by hand"
    )
    hosts.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    hosts.add_argument("--num-processes", type=cli.count, help="number of processes")
    hosts.add_argument("--process-id", type=cli.non_negative, help="this process's index, 0..N-1")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    by_hand = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in by_hand) and any(v is None for v in by_hand):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and args.process_id >= args.num_processes:
        parser.error(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    return args


def dagm_classes(text: str) -> tuple[int, ...]:
    """``all`` or comma-separated DAGM class numbers 1..10."""
    if text == "all":
        return tuple(range(1, 11))
    try:
        classes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected '6', '1,2,3' or 'all'") from None
    if not classes or any(not 1 <= c <= 10 for c in classes):
        raise argparse.ArgumentTypeError(f"{text!r}: DAGM classes are 1..10")
    return classes


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


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.devices > 1:
        simulate_cpu_devices(args.devices)
    import jax

    from cheapnet_jax.training import TrainConfig, train_and_evaluate

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.distributed or args.coordinator is not None:
        start_processes(args)
    if args.devices > 1 and jax.default_backend() == "cpu" and jax.process_index() == 0:
        print(f"no accelerator: simulating {args.devices} CPU devices per process")
    config = TrainConfig(
        features=args.features if args.features is not None else VARIANTS[args.variant],
        devices=args.devices,
        data=args.data,
        classes=args.classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        milestones=args.milestones,
        gamma=args.gamma,
        seed=args.seed,
        workdir=args.workdir,
        image_size=args.image_size,
        synthetic_train=args.synthetic_train,
        synthetic_validation=args.synthetic_validation,
        keep_checkpoints=args.keep_checkpoints,
        impl=args.impl,
        loss=args.loss,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    train_and_evaluate(config, allow_changes=args.allow_changes)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
