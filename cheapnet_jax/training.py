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

import contextlib
import dataclasses
import functools
import json
import math
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
from tqdm import tqdm

from cheapnet_jax import data, data_check, layouts, metrics, synthetic, tfds_data
from cheapnet_jax.augmentation import augment_batch, augmentation_flags, step_key
from cheapnet_jax.checkpoints import CHECKPOINT_DIR, Checkpoints
from cheapnet_jax.errors import DataError, SettingsError, TrainingDivergedError
from cheapnet_jax.files import exclusive_lock, write_atomic
from cheapnet_jax.losses import POS_WEIGHT, Loss, bce_with_logits, check_loss_name, loss_named
from cheapnet_jax.model import CheapNet, init_variables
from cheapnet_jax.runlog import MetricsLog

AXIS = "batch"
LOG_EVERY = 10
"""Training steps between host syncs (loss and finiteness checks, the progress bar): in between
the device runs ahead of the host."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to ``workdir/config.json``."""

    features: int = 2
    devices: int = 1
    data: str = "synthetic"
    classes: tuple[int, ...] = (6,)
    # "paper": defective images only, 8:2 (the paper's figures); "dagm": DAGM's Train folder,
    # good images included, 8:2 into train and validation (Test left for evaluation)
    protocol: str = "paper"
    # an annotated layout's classes that are defects (empty: all; `cheapnet_jax.layouts`)
    defect_classes: tuple[str, ...] = ()
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
    loss: str = "bce-logits"  # or "bce-sigmoid": the authors' BCELoss(sigmoid), exactly
    # The recipe (`RECIPES`) and its parts: augmentation on the device, defect-balanced
    # batches, BCE's weight of defect pixels, early stopping. "paper": none of them.
    recipe: str = "paper"
    augment: tuple[str, ...] = ()
    crop_size: int = 0  # 0: whole images
    balance: float = 0.0  # the share of defective images in each batch (0: as drawn)
    pos_weight: float = POS_WEIGHT
    patience: int = 0  # epochs without a better validation defect IoU before stopping; 0: never
    dtype: str = "float32"  # "float64" for reproduction checks (needs jax_enable_x64)
    progress: bool = True


RECIPES: dict[str, dict] = {
    "paper": {"loss": "bce-logits", "augment": (), "crop_size": 0, "balance": 0.0, "patience": 0},
    "small": {
        "loss": "bce-logits+dice",
        "augment": ("flip", "rot90", "brightness", "contrast", "gamma"),
        "crop_size": 0,
        "balance": 0.5,
        "patience": 0,
    },
}
"""``--recipe`` presets: the settings each sets (flags given explicitly win). "paper": the
paper's recipe, no augmentation, plain BCE, every epoch. "small": for small, imbalanced sets,
the best of the recipes `benchmarks/recipes.py` compared (BENCHMARKS.md, "Training recipes"):
every augmentation, half of each batch defective, BCE plus Dice."""
RECIPE_SETTINGS = ("loss", "augment", "crop_size", "balance", "patience")


def with_recipe(config: TrainConfig, recipe: str, **explicit) -> TrainConfig:
    """``config`` with ``recipe``'s settings, then the ``explicit`` ones."""
    if recipe not in RECIPES:
        raise SettingsError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return dataclasses.replace(config, recipe=recipe, **{**RECIPES[recipe], **explicit})


DTYPES = {"float32": np.float32, "float64": np.float64}
"""``--dtype`` choices: the dtype of parameters, optimizer state and inputs."""

RESUME_SETTINGS = (
    "features",
    "data",
    "classes",
    "protocol",
    "defect_classes",
    "batch_size",
    "lr",
    "milestones",
    "gamma",
    "seed",
    "image_size",
    "synthetic_train",
    "synthetic_validation",
    "loss",
    "dtype",
    "augment",
    "crop_size",
    "balance",
    "pos_weight",
)
"""The settings a resumed run must share with the run it continues. The device count, the
epoch count, the layer implementation and the bookkeeping may change (the step does not depend
on how the global batch is split over devices)."""


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
    """The synthetic default, a DAGM 2007 root folder split by ``config.protocol``, a folder of
    another layout split 8:2 (`layouts.training_splits`), or a prepared TFDS dataset
    (``tfds:dagm2007/class6``, `cheapnet_jax.tfds_data`)."""
    if tfds_data.is_tfds(config.data):
        # read on demand: each process reads only its share of each batch
        train, validation = tfds_data.training_splits(config.data, config.protocol, config.seed)
        mean, std = tfds_data.normalization_statistics(train)
        description = f"{config.data} ({config.protocol} protocol)"
        return Dataset(
            train.images, train.masks, validation.images, validation.masks, mean, std, description
        )
    if config.data == "synthetic":
        train, validation = synthetic_splits(config)
        description = f"synthetic {config.image_size}x{config.image_size}"
    else:
        splits, description = layouts.training_splits(
            config.data, list(config.classes), config.protocol, config.seed, config.defect_classes
        )
        train = data.load_samples(splits["train"], progress=config.progress)
        validation = data.load_samples(splits["validation"], progress=config.progress)
    mean, std = data.normalization_statistics(train[0])
    return Dataset(*train, *validation, mean=mean, std=std, description=description)


def check_training_data(config: TrainConfig) -> None:
    """The data check of a folder given as ``--data`` (`data_check.check_folder`, as
    ``cheapnet-data check`` runs it), before anything is written: DataError naming its first
    error, its warnings printed. Synthetic and TFDS data are not checked."""
    if config.data == "synthetic" or tfds_data.is_tfds(config.data):
        return
    report = data_check.check_folder(
        config.data,
        defect_classes=config.defect_classes,
        classes=config.classes,
        protocol=config.protocol,
        seed=config.seed,
    )
    if report.errors:
        more = len(report.errors) - 1
        others = f" (and {more} more: cheapnet-data check {config.data})" if more else ""
        raise DataError(f"{report.errors[0]}{others}")
    if jax.process_index() == 0:
        for line in report.warnings:
            print(f"data check: warning: {line}")


def synthetic_splits(config: TrainConfig) -> tuple[tuple, tuple]:
    """``(train, validation)`` synthetic ``(images, masks)`` (good images: see
    `synthetic.protocol_defect_free`)."""
    return tuple(
        synthetic.make_split(
            split,
            count,
            config.image_size,
            config.seed,
            synthetic.protocol_defect_free(count, config.protocol),
        )
        for split, count in (
            ("train", config.synthetic_train),
            ("validation", config.synthetic_validation),
        )
    )


def stepped_learning_rate(lr, gamma: float, milestones: tuple[int, ...], epoch):
    """lr * gamma ** (milestones passed by ``epoch``, 0-based).

    ``epoch`` is an int (logs) or a traced integer array (the optimizer's schedule); ``lr`` a
    float, or a traced array (a population's members, `cheapnet_jax.population`).
    """
    return lr * gamma ** sum(epoch >= m for m in milestones)


def learning_rate_at(config: TrainConfig, epoch):
    """The learning rate of ``config`` during ``epoch`` (`stepped_learning_rate`)."""
    return stepped_learning_rate(config.lr, config.gamma, config.milestones, epoch)


def stepped_adam(lr, gamma: float, milestones: tuple[int, ...], steps_per_epoch):
    """Adam on `stepped_learning_rate` of the epoch that optimizer step ``count`` (0-based)
    belongs to: the paper's optimizer. ``lr`` and ``steps_per_epoch`` may be traced arrays
    (arguments of a compiled step, see `parallel_train_step`)."""
    return optax.adam(
        lambda count: stepped_learning_rate(lr, gamma, milestones, count // steps_per_epoch)
    )


def training_optimizer(config: TrainConfig) -> Callable[..., optax.GradientTransformation]:
    """``(lr, steps_per_epoch) -> optimizer`` (`stepped_adam` with ``config``'s gamma and
    milestones), for `parallel_train_step` with `optimizer_arguments`."""
    return lambda lr, steps_per_epoch: stepped_adam(
        lr, config.gamma, config.milestones, steps_per_epoch
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """`training_optimizer` with ``config``'s learning rate: the optimizer whose state a run
    starts from and saves (the same structure whether its settings are constants or
    arguments)."""
    return training_optimizer(config)(config.lr, steps_per_epoch)


def optimizer_arguments(config: TrainConfig, steps_per_epoch: int) -> tuple[np.ndarray, ...]:
    """The arguments `training_optimizer` takes at run time: the learning rate in the run's
    float type (the type a Python float takes inside the program) and the steps per epoch."""
    return np.asarray(config.lr, DTYPES[config.dtype]), np.asarray(steps_per_epoch, np.int32)


def initial_state(
    config: TrainConfig, model: CheapNet, optimizer: optax.GradientTransformation
) -> TrainState:
    """`create_state` from ``config.seed``, its floats in ``config.dtype``."""
    return cast_floats(
        create_state(model, optimizer, jax.random.key(config.seed)), DTYPES[config.dtype]
    )


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


Augment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""``(step, x, masks) -> (x, masks)``: a step's augmentation (`augmenter`)."""


def augmenter(config: TrainConfig, mean, std) -> Augment | None:
    """``config``'s augmentation (`augmenting`) of inputs normalised by ``mean`` and ``std``;
    None when it has none."""
    if not config.augment and not config.crop_size:
        return None
    flags = jnp.asarray(augmentation_flags(config.augment))
    return augmenting(config.seed, flags, mean, std, config.crop_size)


def augmenting(seed, flags, mean, std, crop_size: int) -> Augment:
    """Augmentation on the device (`augmentation.augment_batch`) with ``flags`` of inputs
    normalised by ``mean`` and ``std``, its draws keyed by ``seed``, the step and the device.
    ``seed``, ``flags``, ``mean`` and ``std`` may be traced values (a population's members)."""

    def augment(step, x, masks):
        key = step_key(seed, step, AXIS)
        return augment_batch(key, x, masks, flags, mean, std, crop_size)

    return augment


def make_train_step(
    model: CheapNet,
    optimizer: optax.GradientTransformation,
    loss: Loss = bce_with_logits,
    augment: Augment | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """One step on one device's share of the batch; collectives over the axis ``"batch"``.

    x: [b, H, W, 1] normalised, masks: [b, H, W, 1] bool, augmented first by ``augment``
    (`augmenter`) when given. Every device holds the same number of examples, so the pmean of
    per-device means is the global mean. ``out["finite"]`` says whether every updated parameter
    is finite, so that the update after the last loss of an epoch is checked too before the
    state is saved.
    """

    def step(state: TrainState, x: jax.Array, masks: jax.Array) -> tuple[TrainState, dict]:
        if augment is not None:
            x, masks = augment(state.step, x, masks)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return loss(logits, masks), updates["batch_stats"]

        (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        value = jax.lax.pmean(value, AXIS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,  # already cross-device: BatchNorm pmeans its statistics
            opt_state=opt_state,
        )
        finite = jnp.all(
            jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves((params, batch_stats))])
        )
        return new_state, {"loss": value, "finite": finite}

    return step


def parallel_train_step(
    model: CheapNet,
    optimizer: Callable[..., optax.GradientTransformation],
    devices: list[jax.Device],
    loss: Loss = bce_with_logits,
    optimizer_args: tuple = (),
    augment: Augment | None = None,
) -> Callable[[TrainState, np.ndarray, np.ndarray], tuple[TrainState, dict]]:
    """`make_train_step` data-parallel over ``devices``: the state goes in and comes out
    unreplicated, x and masks carry a leading device axis (`data.shard_batch`).

    The optimizer is ``optimizer(*optimizer_args)``, built inside the compiled step with
    ``optimizer_args`` as the program's arguments rather than constants: runs that differ
    only in them (the learning rate, the steps per epoch: `optimizer_arguments`) run one
    compiled program, read from the compilation cache by every run after the first.
    """

    def step(args, state, x, masks):
        return make_train_step(model, optimizer(*args), loss, augment)(state, x, masks)

    stepped = jax.pmap(
        step, axis_name=AXIS, in_axes=(None, None, 0, 0), out_axes=(None, None), devices=devices
    )
    return functools.partial(stepped, tuple(optimizer_args))


def replicated_sharding(devices: list[jax.Device]) -> jax.sharding.NamedSharding:
    """The whole of an array on each of ``devices``: where a train state lives between steps,
    as pmap returns it (out_axes=None), so that the first and later steps share one program."""
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec()
    )


def parallel_eval_step(step: Callable, devices: list[jax.Device]) -> Callable:
    """An eval step (`make_eval_step`, or a vmap of it) data-parallel over ``devices``: the
    state unreplicated, x, masks and valid with a leading device axis, the counts psum-ed."""
    return jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, 0, 0), out_axes=None, devices=devices)


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
    dtype=np.float32,
) -> metrics.ConfusionCounts:
    """Counts over the whole validation split: the last batch is padded and masked."""
    totals = metrics.ConfusionCounts(0, 0, 0, 0)
    for start in range(0, len(images), batch_size):
        batch = validation_batch(images, masks, start, batch_size, devices, mean, std, dtype)
        totals = totals + metrics.counts_from_array(eval_step(state, *batch))
    return totals


def validation_batch(
    images: np.ndarray,
    masks: np.ndarray,
    start: int,
    batch_size: int,
    devices: int,
    mean: float,
    std: float,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, masks, valid)`` of this host's share of the global batch from ``start``, each
    ``[devices, b, ...]``; positions past the end repeat the last image and are invalid."""
    positions = data.host_share(np.arange(start, start + batch_size))
    valid = positions < len(images)
    chosen = np.minimum(positions, len(images) - 1)
    x = data.normalize(images[chosen], mean, std).astype(dtype)
    y = masks[chosen][..., None]
    return tuple(data.shard_batch(a, devices) for a in (x, y, valid))


def training_batch(
    dataset: Dataset, rows: np.ndarray, devices: int, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, masks)`` of this host's share of the global batch ``rows`` (example indices),
    normalised by the dataset's statistics, each ``[devices, b, H, W, 1]``."""
    chosen = data.host_share(rows)
    x = data.normalize(dataset.train_images[chosen], dataset.mean, dataset.std).astype(dtype)
    y = dataset.train_masks[chosen][..., None]
    return data.shard_batch(x, devices), data.shard_batch(y, devices)


def config_json(config: TrainConfig) -> dict:
    """``config`` as its config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_config(config: TrainConfig) -> None:
    """ValueError naming the flag and its accepted range for a setting that cannot work."""
    counts = {
        "--devices": config.devices,
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--features": config.features,
        "--synthetic-train": config.synthetic_train,
        "--synthetic-validation": config.synthetic_validation,
        "--keep-checkpoints": config.keep_checkpoints,
    }
    for flag, value in counts.items():
        if value < 1:
            raise SettingsError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--lr", config.lr), ("--gamma", config.gamma)):
        if not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{flag} must be a finite number > 0, got {value}")
    milestones = list(config.milestones)
    if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise SettingsError(
            f"--milestones must be increasing epochs >= 1, got {','.join(map(str, milestones))}"
        )
    if config.image_size < 16 or config.image_size % 16:
        raise SettingsError(f"--image-size must be a multiple of 16, got {config.image_size}")
    if config.protocol not in ("paper", "dagm"):
        raise SettingsError(f"--protocol must be paper or dagm, got {config.protocol!r}")
    try:
        check_loss_name(config.loss)
        augmentation_flags(config.augment)
    except ValueError as err:
        raise SettingsError(f"--loss/--augment: {err}") from None
    if config.recipe not in RECIPES:
        raise SettingsError(f"--recipe must be one of {', '.join(RECIPES)}, got {config.recipe!r}")
    if config.crop_size < 0 or config.crop_size % 16:
        raise SettingsError(f"--crop-size must be 0 or a multiple of 16, got {config.crop_size}")
    if not 0 <= config.balance < 1:
        raise SettingsError(f"--balance must be in [0, 1), got {config.balance}")
    if not (math.isfinite(config.pos_weight) and config.pos_weight > 0):
        raise SettingsError(f"--pos-weight must be a number > 0, got {config.pos_weight}")
    if config.patience < 0:
        raise SettingsError(f"--patience must be >= 0, got {config.patience}")
    if config.dtype not in DTYPES:
        raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise SettingsError("--dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")


def check_crop_size(crop_size: int, dataset: Dataset) -> None:
    """SettingsError unless ``--crop-size`` fits the dataset's training images."""
    if not crop_size:
        return
    image_shape = np.shape(dataset.train_images[np.arange(1)])[1:3]
    if crop_size > min(image_shape):
        raise SettingsError(
            f"--crop-size {crop_size} is larger than the training images "
            f"({image_shape[0]}x{image_shape[1]})"
        )


def changed_settings(saved: Mapping, config: TrainConfig) -> list[str]:
    """``name: saved -> new`` for each of `RESUME_SETTINGS` that differs from a saved config."""
    new = config_json(config)
    return [
        f"{name}: {saved.get(name)!r} -> {new[name]!r}"
        for name in RESUME_SETTINGS
        if saved.get(name, new[name]) != new[name]
    ]


def check_resumable(saved_meta: Mapping | None, config: TrainConfig) -> None:
    """SettingsError naming the `RESUME_SETTINGS` in which the run whose latest checkpoint
    has ``saved_meta`` (None: nothing saved yet) differs from ``config``."""
    changes = [] if saved_meta is None else changed_settings(saved_meta["config"], config)
    if changes:
        raise SettingsError(
            f"{Path(config.workdir)} holds a run with other settings ({'; '.join(changes)}): "
            "use another --workdir, or --allow-changes to continue it with the new ones"
        )


def write_run_files(config: TrainConfig) -> None:
    """The workdir's ``config.json`` and ``command.txt`` (the command line that started it)."""
    workdir = Path(config.workdir)
    write_atomic(workdir / "config.json", json.dumps(config_json(config), indent=2) + "\n")
    write_atomic(workdir / "command.txt", " ".join(sys.argv) + "\n")


def training_devices(config: TrainConfig) -> list[jax.Device]:
    """The devices pmap spans: ``config.devices`` local ones, or every process's devices;
    SettingsError when they are not there or the global batch does not split over them."""
    local = jax.local_devices()
    if len(local) < config.devices:
        raise SettingsError(
            f"--devices {config.devices}: only {len(local)} {jax.default_backend()} devices here"
        )
    if jax.process_count() == 1:
        devices = local[: config.devices]
    elif config.devices != len(local):
        raise SettingsError(
            f"--devices {config.devices}: with several processes each must use all its "
            f"{len(local)} local devices"
        )
    else:
        devices = jax.devices()
    if config.batch_size % len(devices):
        raise SettingsError(
            f"--batch-size {config.batch_size} must be a multiple of the {len(devices)} devices"
        )
    return devices


def train_and_evaluate(config: TrainConfig, *, allow_changes: bool = False) -> dict:
    """Train (resuming from ``workdir`` when it holds a checkpoint); returns the final metrics.

    ``config.devices`` are this process's devices. Under `jax.distributed` (several processes)
    every process uses all its local devices and reads only its own share of every global
    batch (`data.host_share`); pmap spans the devices of all processes; process 0 alone writes
    the logs, and orbax writes one checkpoint. A resumed run must keep `RESUME_SETTINGS`
    (ValueError naming those that differ) unless ``allow_changes``; its device count may differ.
    """
    check_config(config)
    devices = training_devices(config)
    check_training_data(config)
    primary = jax.process_index() == 0
    workdir = Path(config.workdir)
    # Process 0 holds the workdir's lock for the run: a second run on it stops at once.
    with exclusive_lock(workdir, "training run") if primary else contextlib.nullcontext():
        return _locked_train(config, devices, primary, allow_changes)


def _locked_train(config: TrainConfig, devices: list, primary: bool, allow_changes: bool) -> dict:
    workdir = Path(config.workdir)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    try:
        if not allow_changes:
            check_resumable(checkpoints.latest_meta(), config)
        if primary:
            write_run_files(config)
        return _train(config, checkpoints, devices, primary)
    finally:
        checkpoints.close()


def _train(config: TrainConfig, checkpoints: Checkpoints, devices: list, primary: bool) -> dict:
    dataset = load_dataset(config)
    if len(dataset.train_images) < config.batch_size:
        raise SettingsError(
            f"{len(dataset.train_images)} training images, fewer than one batch of "
            f"{config.batch_size}"
        )
    check_crop_size(config.crop_size, dataset)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    dtype = DTYPES[config.dtype]
    model = CheapNet(config.features, impl=config.impl, bn_axis_name=AXIS)
    optimizer = make_optimizer(config, steps_per_epoch)
    state = initial_state(config, model, optimizer)
    replicated = replicated_sharding(devices)
    restored = checkpoints.restore_latest(state, replicated)
    first_epoch = 0
    if restored is not None:
        state, meta = restored
        first_epoch = int(meta["epoch"]) + 1
        if primary:
            print(f"resumed from {config.workdir} at epoch {first_epoch} (step {int(state.step)})")
    else:
        state = jax.device_put(state, replicated)

    train_step = parallel_train_step(
        model,
        training_optimizer(config),
        devices,
        loss_named(config.loss, config.pos_weight),
        optimizer_arguments(config, steps_per_epoch),
        augmenter(config, dataset.mean, dataset.std),
    )
    eval_step = parallel_eval_step(
        make_eval_step(CheapNet(config.features, impl=config.impl)), devices
    )
    log = MetricsLog(Path(config.workdir)) if primary else None
    figures: dict = {}
    stopping = EarlyStopping.resumed(config.patience, meta if restored is not None else None)
    try:
        for epoch in range(first_epoch, config.epochs):
            if stopping.stopped:
                break
            state, train_loss = _train_epoch(
                config, dataset, state, train_step, epoch, steps_per_epoch, primary
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
                dtype,
            )
            figures = epoch_figures(config, epoch, state, train_loss, counts)
            stopping.update(epoch, figures["validation"]["iou_defect"])
            figures["early_stopping"] = stopping.as_json()
            if log is not None:
                log.write(figures)
            checkpoints.save(state, checkpoint_meta(figures, config, dataset))
            v = figures["validation"]
            if primary:
                print(
                    f"epoch {epoch + 1}/{config.epochs}: loss {train_loss:.4f}, validation mIoU "
                    f"{v['miou']:.4f}, IoU defect {v['iou_defect']:.4f}"
                )
                if stopping.stopped:
                    print(stopping.message())
    finally:
        if log is not None:
            log.close()
    if log is not None:
        log.plot()
    return figures


@dataclass
class EarlyStopping:
    """Stop when the validation defect IoU has not improved for ``patience`` epochs (0:
    never). Its state goes into each checkpoint's meta, so a resumed run stops where the
    uninterrupted one would."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    stopped: bool = False

    @classmethod
    def resumed(cls, patience: int, meta: Mapping | None) -> EarlyStopping:
        saved = (meta or {}).get("early_stopping") or {}
        best = saved.get("best")
        stopping = cls(patience, -math.inf if best is None else best, saved.get("best_epoch", -1))
        if meta is not None and patience:
            stopping.stopped = int(meta["epoch"]) - stopping.best_epoch >= patience
        return stopping

    def update(self, epoch: int, iou_defect: float) -> None:
        if math.isfinite(iou_defect) and iou_defect > self.best:
            self.best, self.best_epoch = iou_defect, epoch
        self.stopped = bool(self.patience) and epoch - self.best_epoch >= self.patience

    def as_json(self) -> dict:
        best = self.best if math.isfinite(self.best) else None
        return {"best": best, "best_epoch": self.best_epoch, "stopped": self.stopped}

    def message(self) -> str:
        return (
            f"stopped early: the validation defect IoU has not improved for {self.patience} "
            f"epochs (best {self.best:.4f} at epoch {self.best_epoch + 1})"
        )


def epoch_figures(
    config: TrainConfig,
    epoch: int,
    state: TrainState,
    train_loss: float,
    counts: metrics.ConfusionCounts,
) -> dict:
    """An epoch's line of metrics.jsonl: step, mean training loss, lr, validation metrics."""
    return {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": train_loss,
        "lr": learning_rate_at(config, epoch),
        "validation": {**metrics.segmentation_metrics(counts), "confusion": counts._asdict()},
    }


def checkpoint_meta(figures: dict, config: TrainConfig, dataset: Dataset) -> dict:
    """What a checkpoint records beside the arrays: the epoch's figures, the run's config
    and the normalisation its inputs had."""
    return {
        **figures,
        "config": config_json(config),
        "normalization": {"mean": dataset.mean, "std": dataset.std},
    }


def cast_floats(tree, dtype):
    """Every floating-point leaf of ``tree`` as ``dtype`` (integers, such as steps, unchanged)."""
    return jax.tree.map(
        lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
        tree,
    )


def training_order(config: TrainConfig, dataset: Dataset, epoch: int, steps: int) -> np.ndarray:
    """The examples of an epoch's ``steps`` batches, in order: shuffled (`data.epoch_order`),
    or with ``config.balance`` of each batch defective (`data.balanced_order`)."""
    if config.balance:
        if "defective" not in dataset.extra:  # read once (a TFDS split reads on demand)
            masks = dataset.train_masks[np.arange(len(dataset.train_masks))]
            dataset.extra["defective"] = np.asarray(masks).reshape(len(masks), -1).any(axis=1)
        defective = dataset.extra["defective"]
        return data.balanced_order(
            defective, config.seed, epoch, config.batch_size, steps, config.balance
        )
    return data.epoch_order(len(dataset.train_images), config.seed, epoch)


def _train_epoch(config, dataset, state, train_step, epoch, steps_per_epoch, primary):
    order = training_order(config, dataset, epoch, steps_per_epoch)
    lr = learning_rate_at(config, epoch)
    dtype = DTYPES[config.dtype]
    losses = []
    progress = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        disable=not (config.progress and primary),
        leave=False,
    )

    def prepare(index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = order[index * config.batch_size : (index + 1) * config.batch_size]
        return training_batch(dataset, rows, config.devices, dtype)

    start = time.perf_counter()
    first_step = epoch * steps_per_epoch + 1  # runs resume at epoch boundaries
    pending: list[dict] = []  # step outputs still on the device
    # One thread prepares the next batches while the device runs the current step.
    batches = data.threaded_map(prepare, range(steps_per_epoch), workers=1, ahead=2)
    for index, (x, y) in enumerate(batches):
        state, out = train_step(state, x, y)
        pending.append(out)
        if len(pending) < LOG_EVERY and index + 1 < steps_per_epoch:
            continue
        # A log point: the one host sync for the steps since the last one.
        for offset, checked in enumerate(jax.device_get(pending)):
            step = first_step + index + 1 - len(pending) + offset
            _check_step(checked, config, epoch, step, lr)
            losses.append(float(checked["loss"]))
        progress.update(len(pending))
        pending = []
        rate = (index + 1) * config.batch_size / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:g}", img_s=f"{rate:.1f}")
    progress.close()
    return state, float(np.mean(losses))


def divergence(loss: float, finite: bool, workdir: str, epoch: int, step: int, lr: float):
    """What went wrong at a step whose loss or update is not finite; None when both are."""
    if math.isfinite(loss) and finite:
        return None
    what = f"loss became {loss}" if not math.isfinite(loss) else "parameters became NaN/inf"
    return (
        f"{what} at epoch {epoch + 1}, step {step} (lr {lr}); "
        f"the last good checkpoint is kept in {workdir}/{CHECKPOINT_DIR}"
    )


def _check_step(out: Mapping, config: TrainConfig, epoch: int, step: int, lr: float) -> None:
    """TrainingDivergedError naming the step when its loss or its update is not finite."""
    message = divergence(float(out["loss"]), bool(out["finite"]), config.workdir, epoch, step, lr)
    if message is not None:
        raise TrainingDivergedError(message)
