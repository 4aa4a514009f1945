"""Training: the paper's recipe, data-parallel over devices with pmap, orbax checkpoints.

    python train.py --variant M --devices 8 --data synthetic --epochs 2

Recipe (defaults): BCE on logits, Adam lr 0.01, learning rate x0.1 at epochs 60 and 90,
120 epochs, no augmentation. The train state is not replicated: `jax.pmap` takes it with
``in_axes=None`` and returns it with ``out_axes=None``; gradients and BatchNorm batch statistics
are averaged across devices inside the step (named axis ``"batch"``), metrics are psum-ed as
sums and counts. Written per device with explicit collectives, so moving to `jax.shard_map`
changes one line.

Determinism: the example order of an epoch is a pure function of (seed, epoch) and the state
is saved at the end of every epoch, so a run killed anywhere and resumed from the same workdir
ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from cheapnet_jax import data, metrics, synthetic
from cheapnet_jax.model import CheapNet, init_variables

AXIS = "batch"
CHECKPOINT_DIR = "checkpoints"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to ``workdir/config.json``."""

    features: int = 2
    devices: int = 1
    data: str = "synthetic"
    classes: tuple[int, ...] = (6,)
    epochs: int = 120
    batch_size: int = 8
    lr: float = 0.01
    milestones: tuple[int, ...] = (60, 90)
    gamma: float = 0.1
    seed: int = 0
    workdir: str = "runs/default"
    image_size: int = 512  # synthetic data only
    synthetic_train: int = 64
    synthetic_validation: int = 16
    keep_checkpoints: int = 3
    impl: str = "auto"
    progress: bool = True


@flax.struct.dataclass
class TrainState:
    """What a training step reads and writes (a pytree; not replicated across devices)."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


@dataclass
class Dataset:
    """In-memory train and validation splits with their normalisation statistics."""

    train_images: np.ndarray
    train_masks: np.ndarray
    validation_images: np.ndarray
    validation_masks: np.ndarray
    mean: float
    std: float
    description: str = ""
    extra: dict = field(default_factory=dict)


def load_dataset(config: TrainConfig) -> Dataset:
    """The synthetic default or the paper's split of a DAGM 2007 root folder."""
    if config.data == "synthetic":
        train = synthetic.make_split(
            "train", config.synthetic_train, config.image_size, config.seed
        )
        validation = synthetic.make_split(
            "validation", config.synthetic_validation, config.image_size, config.seed
        )
        description = f"synthetic {config.image_size}x{config.image_size}"
    else:
        splits = data.paper_split(config.data, list(config.classes), seed=config.seed)
        train = data.load_samples(splits["train"], progress=config.progress)
        validation = data.load_samples(splits["validation"], progress=config.progress)
        description = f"DAGM {config.data} classes {list(config.classes)}"
    mean, std = data.normalization_statistics(train[0])
    return Dataset(*train, *validation, mean=mean, std=std, description=description)


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate during ``epoch`` (0-based): lr * gamma ** (milestones passed)."""
    return config.lr * config.gamma ** sum(epoch >= m for m in config.milestones)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """lr, multiplied by gamma at each milestone epoch (counted in steps)."""
    boundaries = {int(m) * steps_per_epoch: config.gamma for m in config.milestones}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def create_state(
    model: CheapNet, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Fresh parameters and BatchNorm statistics (any image size), optimizer state, step 0."""
    variables = init_variables(model, rng)
    return TrainState(
        step=jnp.array(0, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
    )


def bce_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean binary cross-entropy on logits (numerically stable), as PyTorch's BCELoss(sigmoid)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype)))


def make_train_step(
    model: CheapNet, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """One step on one device's share of the batch; collectives over the axis ``"batch"``.

    x: [b, H, W, 1] normalised, masks: [b, H, W, 1] bool. Every device holds the same number of
    examples, so the pmean of per-device means is the global mean.
    """

    def step(state: TrainState, x: jax.Array, masks: jax.Array) -> tuple[TrainState, dict]:
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return bce_loss(logits, masks), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        loss = jax.lax.pmean(loss, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,  # already cross-device: BatchNorm pmeans its statistics
            opt_state=opt_state,
        )
        return new_state, {"loss": loss, "grads": grads}

    return step


def make_eval_step(model: CheapNet) -> Callable:
    """Confusion counts of one device's share, psum-ed; padded examples carry valid=False."""

    def step(state: TrainState, x: jax.Array, masks: jax.Array, valid: jax.Array) -> jax.Array:
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
        predicted = jax.nn.sigmoid(logits) > 0.5
        counts = metrics.confusion_counts(predicted, masks, valid[:, None, None, None])
        return jax.lax.psum(counts, AXIS)

    return step


def validation_counts(
    eval_step: Callable,
    state: TrainState,
    images: np.ndarray,
    masks: np.ndarray,
    batch_size: int,
    devices: int,
    mean: float,
    std: float,
) -> metrics.ConfusionCounts:
    """Counts over the whole validation split: the last batch is padded and masked."""
    totals = metrics.ConfusionCounts(0, 0, 0, 0)
    for start in range(0, len(images), batch_size):
        # This host's share of the (padded) global batch; padded positions are invalid.
        positions = data.host_share(np.arange(start, start + batch_size))
        valid = positions < len(images)
        chosen = np.minimum(positions, len(images) - 1)
        x = data.normalize(images[chosen], mean, std)
        y = masks[chosen][..., None]
        counts = eval_step(
            state,
            data.shard_batch(x, devices),
            data.shard_batch(y, devices),
            data.shard_batch(valid, devices),
        )
        totals = totals + metrics.counts_from_array(counts)
    return totals


class Checkpoints:
    """The latest N states and the best by validation mIoU, written atomically by orbax.

    Two managers: ``latest`` keeps the last N epochs (items ``model``: params and batch_stats,
    ``opt``: step and optimizer state, ``meta``: JSON with epoch, config, normalisation and
    metrics); ``best`` keeps ``model`` and ``meta`` of the best epoch, written only when the
    validation mIoU improves (one manager with ``best_fn`` would keep the N best and could
    delete the latest).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int):
        root = Path(workdir).absolute() / CHECKPOINT_DIR
        self.latest = ocp.CheckpointManager(
            root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        )
        self.best_miou = -math.inf

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(state.step)
        score = meta["validation"]["miou"]
        improved = math.isfinite(score) and score > self.best_miou
        if improved:
            self.best_miou = score
        meta = {**meta, "best_miou": self.best_miou}
        model = ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats})
        opt = ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state})
        self.latest.save(
            step, args=ocp.args.Composite(model=model, opt=opt, meta=ocp.args.JsonSave(meta))
        )
        if improved:
            self.best.save(step, args=ocp.args.Composite(model=model, meta=ocp.args.JsonSave(meta)))
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
        step = self.latest.latest_step()
        if step is None:
            return None
        model = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
        opt = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(model),
                opt=ocp.args.StandardRestore(opt),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = restored["meta"]
        if meta.get("best_miou") is not None and math.isfinite(meta["best_miou"]):
            self.best_miou = meta["best_miou"]
        state = TrainState(
            step=restored["opt"]["step"],
            params=restored["model"]["params"],
            batch_stats=restored["model"]["batch_stats"],
            opt_state=restored["opt"]["opt_state"],
        )
        return state, meta

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_orbax_checkpoint(
    path: str | os.PathLike, *, impl: str = "auto"
) -> tuple[CheapNet, dict, dict]:
    """``(model, variables, meta)`` from a workdir, its ``checkpoints`` folder, or one step.

    A workdir gives its best checkpoint (the latest when none has a validation score).
    """
    path = Path(path).absolute()
    candidates = [
        path / CHECKPOINT_DIR / "best",
        path / CHECKPOINT_DIR / "latest",
        path / "best",
        path / "latest",
        path,
    ]
    for folder in candidates:
        if not folder.is_dir():
            continue
        if (folder / "meta").is_dir():  # one step folder
            directory, step = folder.parent, int(folder.name)
        else:
            steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
            if not steps:
                continue
            directory, step = folder, None
        with ocp.CheckpointManager(directory) as manager:
            if step is None:
                step = manager.latest_step()
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
            model = CheapNet(int(meta["config"]["features"]), impl=impl)
            abstract = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
            restored = manager.restore(
                step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract))
            )
        return model, dict(restored["model"]), meta
    raise FileNotFoundError(f"{path}: no orbax checkpoint of cheapnet-jax found there")


def _jsonable(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def train_and_evaluate(config: TrainConfig) -> dict:
    """Train (resuming from ``workdir`` when it holds a checkpoint); returns the final metrics.

    ``config.devices`` are this process's devices. Under `jax.distributed` (several processes)
    every process must use all its local devices; each reads its own share of every global
    batch (`data.host_share`) and pmap spans the devices of all processes.
    """
    devices = jax.local_devices()[: config.devices]
    if len(devices) < config.devices:
        raise ValueError(
            f"--devices {config.devices}: only {len(jax.local_devices())} "
            f"{jax.default_backend()} devices here"
        )
    if jax.process_count() > 1:
        if config.devices != jax.local_device_count():
            raise ValueError("with several processes, --devices must be the local device count")
        devices = jax.devices()  # pmap over every process's devices
    if config.batch_size % len(devices):
        raise ValueError(
            f"--batch-size {config.batch_size} must be a multiple of the {len(devices)} devices"
        )
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(_jsonable(config), indent=2) + "\n")
    (workdir / "command.txt").write_text(" ".join(sys.argv) + "\n")

    dataset = load_dataset(config)
    if len(dataset.train_images) < config.batch_size:
        raise ValueError(
            f"{len(dataset.train_images)} training images, fewer than one batch of "
            f"{config.batch_size}"
        )
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    model = CheapNet(config.features, impl=config.impl, bn_axis_name=AXIS)
    optimizer = optax.adam(learning_rate_schedule(config, steps_per_epoch))
    state = create_state(model, optimizer, jax.random.key(config.seed))

    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    restored = checkpoints.restore_latest(state)
    first_epoch = 0
    if restored is not None:
        state, meta = restored
        first_epoch = int(meta["epoch"]) + 1
        print(f"resumed from {workdir} at epoch {first_epoch} (step {int(state.step)})")
    # Placed as pmap returns it (replicated over the devices' mesh), so that the first and
    # later steps share one compiled program.
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec()
    )
    state = jax.device_put(state, replicated)

    train_step = jax.pmap(
        make_train_step(model, optimizer),
        axis_name=AXIS,
        in_axes=(None, 0, 0),
        out_axes=(None, None),
        devices=devices,
    )
    eval_step = jax.pmap(
        make_eval_step(CheapNet(config.features, impl=config.impl)),
        axis_name=AXIS,
        in_axes=(None, 0, 0, 0),
        out_axes=None,
        devices=devices,
    )
    log = MetricsLog(workdir)
    figures: dict = {}
    try:
        for epoch in range(first_epoch, config.epochs):
            state, train_loss = _train_epoch(
                config, dataset, state, train_step, epoch, steps_per_epoch
            )
            counts = validation_counts(
                eval_step,
                state,
                dataset.validation_images,
                dataset.validation_masks,
                config.batch_size,
                config.devices,
                dataset.mean,
                dataset.std,
            )
            figures = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": train_loss,
                "lr": learning_rate_at(config, epoch),
                "validation": {
                    **metrics.segmentation_metrics(counts),
                    "confusion": counts._asdict(),
                },
            }
            log.write(figures)
            checkpoints.save(
                state,
                {
                    **figures,
                    "config": _jsonable(config),
                    "normalization": {"mean": dataset.mean, "std": dataset.std},
                },
            )
            v = figures["validation"]
            print(
                f"epoch {epoch + 1}/{config.epochs}: loss {train_loss:.4f}, validation mIoU "
                f"{v['miou']:.4f}, IoU defect {v['iou_defect']:.4f}"
            )
    finally:
        checkpoints.close()
        log.close()
    log.plot()
    return figures


def _train_epoch(config, dataset, state, train_step, epoch, steps_per_epoch):
    order = data.epoch_order(len(dataset.train_images), config.seed, epoch)
    lr = learning_rate_at(config, epoch)
    losses = []
    progress = tqdm(
        range(steps_per_epoch),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        disable=not config.progress,
        leave=False,
    )

    def prepare(index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = data.host_share(order[index * config.batch_size : (index + 1) * config.batch_size])
        x = data.normalize(dataset.train_images[chosen], dataset.mean, dataset.std)
        y = dataset.train_masks[chosen][..., None]
        return data.shard_batch(x, config.devices), data.shard_batch(y, config.devices)

    start = time.perf_counter()
    # One thread prepares the next batches while the device runs the current step.
    batches = data.threaded_map(prepare, range(steps_per_epoch), workers=1, ahead=2)
    for index, (x, y) in zip(progress, batches, strict=True):
        state, out = train_step(state, x, y)
        loss = float(out["loss"])
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss} at epoch {epoch + 1}, step {int(state.step)} (lr {lr}); "
                f"the last good checkpoint is kept in {config.workdir}/{CHECKPOINT_DIR}"
            )
        losses.append(loss)
        rate = (index + 1) * config.batch_size / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:g}", img_s=f"{rate:.1f}")
    return state, float(np.mean(losses))


class MetricsLog:
    """metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and a PNG plot."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.workdir = workdir
        self.jsonl = workdir / "metrics.jsonl"
        self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, figures: Mapping) -> None:
        with self.jsonl.open("a") as file:
            file.write(json.dumps(figures) + "\n")
        step = figures["step"]
        self.writer.add_scalar("train/loss", figures["train_loss"], step)
        self.writer.add_scalar("train/lr", figures["lr"], step)
        for name in ("miou", "iou_defect", "macc", "pixel_acc"):
            self.writer.add_scalar(f"validation/{name}", figures["validation"][name], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def plot(self) -> None:
        if not self.jsonl.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        epochs = [row["epoch"] + 1 for row in rows]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(epochs, [row["train_loss"] for row in rows])
        left.set(xlabel="epoch", ylabel="train BCE", yscale="log", title="training loss")
        for name in ("miou", "iou_defect"):
            right.plot(epochs, [row["validation"][name] for row in rows], label=name)
        right.set(xlabel="epoch", title="validation", ylim=(0, 1))
        right.legend()
        figure.tight_layout()
        figure.savefig(self.workdir / "curves.png", dpi=100)
        plt.close(figure)
