"""Train CheapNet with the paper's recipe, data-parallel over N devices.

    python train.py --variant M --devices 8 --data synthetic --epochs 2 --workdir runs/m

On a CPU-only machine, --devices N simulates N CPU devices. Started again on the same workdir,
it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

VARIANTS = {"S": 2, "M": 32, "L": 1024}  # cheapnet_jax.VARIANTS; kept here to parse before JAX


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--variant", choices=sorted(VARIANTS), default="S")
    width.add_argument("--features", type=int, help="width G (overrides --variant)")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    parser.add_argument("--data", default="synthetic", help="DAGM 2007 root folder or 'synthetic'")
    parser.add_argument("--classes", default="6", help="DAGM classes: '6', '1,2,3' or 'all'")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--milestones", default="60,90", help="epochs where lr is multiplied")
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--image-size", type=int, default=512, help="synthetic data only")
    parser.add_argument("--synthetic-train", type=int, default=64, help="synthetic images")
    parser.add_argument("--synthetic-validation", type=int, default=16)
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="latest N kept")
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
    hosts.add_argument("--num-processes", type=int, help="number of processes")
    hosts.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    by_hand = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in by_hand) and any(v is None for v in by_hand):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None:
        if args.num_processes < 1:
            parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            parser.error(
                f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}"
            )
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    return args


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
    classes = (
        tuple(range(1, 11))
        if args.classes == "all"
        else tuple(int(c) for c in args.classes.split(","))
    )
    config = TrainConfig(
        features=args.features if args.features is not None else VARIANTS[args.variant],
        devices=args.devices,
        data=args.data,
        classes=classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        milestones=tuple(int(m) for m in args.milestones.split(",") if m),
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
    # Importing the package does not start JAX: main() still sets XLA_FLAGS first.
    from cheapnet_jax import cli

    sys.exit(cli.run(main, sys.argv[1:]))
