"""Population training: a sweep of CheapNets of one width trained by one compiled program.

    python train.py --population seed=0..7 --workdir runs/seeds
    python train.py --population lr=0.01,0.003,0.001 seed=0,1      # a grid: 6 members
    python train.py --data DAGM_ROOT --population classes=1..10    # a model per DAGM class

The members share the width G, the image size, the batch size, the device count, the epochs
and the milestones; each may differ in its seed (initialisation, split and data order), its
learning rate, its loss, its DAGM class or its data folder. Their train states are stacked on
a leading member axis and one training step is `jax.vmap`-ed over the members inside the
`jax.pmap` over devices: BatchNorm's cross-device statistics and the gradients' pmean stay per
member (a collective over the device axis of a vmapped value keeps the member axis). Each
member reads its own batches, normalised by its own statistics.

Every member is an ordinary run in ``workdir/members/<name>/`` (config.json, metrics.jsonl,
TensorBoard, checkpoints), equal to what ``train.py`` with the member's settings writes, so
evaluate.py, predict.py, export and ``--calibrate`` read it as any run. ``population.json``
records the members and their status, ``population.csv`` the summary table.

Members with fewer training batches per epoch (another class or folder) sit out the last
steps of each epoch: a per-member ``active`` flag keeps their state unchanged, which keeps
each member's optimizer steps and data order those of its solo run. A member that diverges is
stopped (inactive from then on, its last good checkpoint kept) while the others go on.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cheapnet_jax import data, metrics
from cheapnet_jax.augmentation import augmentation_flags
from cheapnet_jax.checkpoints import MEMBERS_DIR, POPULATION_FILE, Checkpoints
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.files import exclusive_lock, write_atomic
from cheapnet_jax.losses import check_loss_name, loss_named
from cheapnet_jax.model import CheapNet
from cheapnet_jax.runlog import MetricsLog
from cheapnet_jax.training import (
    AXIS,
    DTYPES,
    LOG_EVERY,
    RECIPES,
    Dataset,
    EarlyStopping,
    TrainConfig,
    augmenting,
    check_config,
    check_crop_size,
    check_resumable,
    check_training_data,
    checkpoint_meta,
    config_json,
    divergence,
    epoch_figures,
    initial_state,
    learning_rate_at,
    load_dataset,
    make_eval_step,
    make_optimizer,
    make_train_step,
    parallel_eval_step,
    replicated_sharding,
    stepped_adam,
    training_batch,
    training_devices,
    training_order,
    validation_batch,
    with_recipe,
    write_run_files,
)

MEMBER_KEYS = ("seed", "lr", "loss", "classes", "data", "recipe", "augment", "balance")
"""The settings in which members may differ (``--population KEY=VALUES``)."""
SUMMARY_FILE = "population.csv"


@dataclass(frozen=True)
class Member:
    """One model of a population: its folder name, what sets it apart, its whole config."""

    name: str
    settings: dict
    config: TrainConfig


def _integers(text: str) -> list[int]:
    """``3``, ``0..7`` (inclusive) or ``1,4,9`` (parts may be ranges: ``0..2,5``)."""
    values: list[int] = []
    for part in text.split(","):
        low, dots, high = part.partition("..")
        if dots:
            first, last = int(low), int(high)
            if last < first:
                raise ValueError(f"empty range {part!r}")
            values += range(first, last + 1)
        else:
            values.append(int(part))
    return values


def parse_axis(text: str) -> tuple[str, tuple]:
    """``KEY=VALUES`` -> ``(key, values)``; ValueError saying what was wrong.

    seed: integers and ranges (``0..7``); lr: positive numbers; loss: losses or sums of them
    (``bce-logits+dice``); classes: DAGM classes 1..10 (one per member); data: folders
    (comma-separated); recipe: names of `RECIPES` (each member takes its recipe's settings);
    augment: operations joined by + (``flip+rot90``) or ``none``; balance: shares in [0, 1).
    """
    key, equals, values = text.partition("=")
    if not equals or not values:
        raise ValueError(f"{text!r}: expected KEY=VALUES, e.g. seed=0..7 or lr=0.01,0.001")
    if key not in MEMBER_KEYS:
        raise ValueError(f"{text!r}: members may differ in {', '.join(MEMBER_KEYS)}, not {key!r}")
    try:
        if key == "seed":
            parsed: list = _integers(values)
        elif key == "classes":
            parsed = [(c,) for c in _integers(values)]
            if any(not 1 <= c <= 10 for (c,) in parsed):
                raise ValueError("DAGM classes are 1..10")
        elif key == "lr":
            parsed = [float(v) for v in values.split(",")]
            if any(not (math.isfinite(v) and v > 0) for v in parsed):
                raise ValueError("learning rates must be finite numbers > 0")
        elif key == "loss":
            parsed = values.split(",")
            for name in parsed:
                check_loss_name(name)
        elif key == "recipe":
            parsed = values.split(",")
            unknown = [v for v in parsed if v not in RECIPES]
            if unknown:
                raise ValueError(f"unknown recipe {unknown[0]!r} (one of {', '.join(RECIPES)})")
        elif key == "augment":
            parsed = [() if v == "none" else tuple(v.split("+")) for v in values.split(",")]
            for names in parsed:
                augmentation_flags(names)
        elif key == "balance":
            parsed = [float(v) for v in values.split(",")]
            if any(not 0 <= v < 1 for v in parsed):
                raise ValueError("balance shares must be in [0, 1)")
        else:
            parsed = values.split(",")
    except ValueError as err:
        raise ValueError(f"{text!r}: {err}") from None
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"{text!r}: a value is repeated")
    return key, tuple(parsed)


def population_grid(axes: Sequence[tuple[str, tuple]]) -> list[dict]:
    """Every combination of the axes' values (the first axis varies slowest)."""
    if not axes:
        raise SettingsError("--population needs at least one KEY=VALUES")
    keys = [key for key, _ in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise SettingsError(f"--population names {repeated[0]} twice")
    return [
        dict(zip(keys, combination, strict=True))
        for combination in itertools.product(*(values for _, values in axes))
    ]


def _value_name(key: str, value) -> str:
    if key == "classes":
        return str(value[0])
    if key == "data":
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(value).name or str(value)).strip("-")
    if key in ("lr", "balance"):
        return f"{value:g}"
    if key == "augment":
        return "+".join(value) or "none"
    return str(value)


def population_members(base: TrainConfig, grid: list[dict]) -> list[Member]:
    """The members of ``grid`` over ``base``: names like ``lr-0.01_seed-1``, folders under
    ``base.workdir/members``. SettingsError where two members would share a folder or a
    setting cannot apply to the data."""
    if any("classes" in settings for settings in grid) and (
        base.data == "synthetic" or (Path(base.data) / "images").is_dir()
    ):
        raise SettingsError(
            f"--population classes=...: --data {base.data} has no DAGM classes (a DAGM root "
            "folder has)"
        )
    members = []
    for settings in grid:
        name = "_".join(f"{key}-{_value_name(key, value)}" for key, value in settings.items())
        workdir = str(Path(base.workdir) / MEMBERS_DIR / name)
        others = {key: value for key, value in settings.items() if key != "recipe"}
        config = replace(base, **others, workdir=workdir)
        if "recipe" in settings:
            config = with_recipe(config, settings["recipe"], **others)
        members.append(Member(name, settings, config))
    names = [member.name for member in members]
    for name in names:
        if names.count(name) > 1:
            raise SettingsError(f"--population: two members would both be named {name!r}")
    return members


def _settings_json(settings: dict) -> dict:
    return json.loads(json.dumps(settings))


# On the CPU, members go through the step in chunks whose activations stay within about this
# many pixels (members x images x H x W): one vmap over every member spills the caches. Steps
# of 8 CheapNet-S at batch 8 (BENCHMARKS.md, "Population training"): at 256x256 (524K pixels a
# member) one member at a time took 308 ms against 499 for one vmap (AMD EPYC VM), about 518
# against 619 (Intel Xeon VM); at 64x64 one vmap of 8 (262K pixels) took 19.4 ms against 22.7
# in chunks of 4 on the EPYC, 34.3 against 27.4 on the Xeon. 512K is the compromise.
CPU_CHUNK_PIXELS = 1 << 19


def members_per_chunk(members: int, pixels_per_member: int, chunk_pixels: int | None) -> int:
    """The largest divisor of ``members`` whose chunk holds at most ``chunk_pixels`` pixels
    (at least 1); all of them when ``chunk_pixels`` is None."""
    if chunk_pixels is None:
        return members
    fitting = [
        size
        for size in range(1, members + 1)
        if members % size == 0 and size * pixels_per_member <= chunk_pixels
    ]
    return max(fitting, default=1)


@dataclass(frozen=True)
class SharedSettings:
    """What every member's step shares (constants of the compiled step): the schedule's gamma
    and milestones, the losses members pick from, BCE's defect weight, whether members augment
    and the crop size."""

    gamma: float
    milestones: tuple[int, ...]
    loss_names: tuple[str, ...]
    pos_weight: float
    augmenting: bool
    crop_size: int


def make_population_step(model: CheapNet, shared: SharedSettings, chunk_pixels: int | None = None):
    """The training step of one device's share of every member's batch, vmapped over members
    (in chunks of `members_per_chunk`, one chunk after another, with ``chunk_pixels``).

    Per member: state, x, masks, its learning rate, its steps per epoch (the schedule counts
    epochs by them), the index of its loss in ``shared.loss_names``, whether it takes this step,
    and what its augmentation draws from: its seed, its operations (`augmentation_flags`) and
    its data's normalisation.
    """
    losses = [loss_named(name, shared.pos_weight) for name in shared.loss_names]
    gamma, milestones = shared.gamma, shared.milestones

    def member_step(
        state, x, masks, lr, steps_per_epoch, loss_index, active, seed, flags, mean, std
    ):
        optimizer = stepped_adam(lr, gamma, milestones, steps_per_epoch)
        augment = None
        if shared.augmenting:
            augment = augmenting(seed, flags, mean, std, shared.crop_size)
        if len(losses) == 1:
            loss = losses[0]
        else:
            # Under vmap both losses are computed and one selected; the other's gradient is
            # multiplied by an exact zero.
            def loss(logits, targets):
                return jax.lax.switch(loss_index, losses, logits, targets)

        new_state, out = make_train_step(model, optimizer, loss, augment)(state, x, masks)
        kept = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return kept, out

    def population_step(state, x, masks, *per_member):
        members = per_member[0].shape[0]
        operands = (state, x, masks, *per_member)
        chunk = members_per_chunk(members, math.prod(x.shape[1:4]), chunk_pixels)
        if chunk == 1 and chunk_pixels is not None:  # one at a time, without vmap's cost
            return jax.lax.map(lambda one: member_step(*one), operands)
        if chunk == members:
            return jax.vmap(member_step)(*operands)
        chunks = jax.tree.map(lambda a: a.reshape(members // chunk, chunk, *a.shape[1:]), operands)
        stepped = jax.lax.map(lambda some: jax.vmap(member_step)(*some), chunks)
        return jax.tree.map(lambda a: a.reshape(members, *a.shape[2:]), stepped)

    return population_step


def parallel_population_step(model, shared: SharedSettings, devices):
    """`make_population_step` data-parallel: the stacked state and the per-member settings go
    in unreplicated, x and masks carry ``[devices, members, ...]``. Chunked on the CPU."""
    chunk_pixels = CPU_CHUNK_PIXELS if devices[0].platform == "cpu" else None
    return jax.pmap(
        make_population_step(model, shared, chunk_pixels),
        axis_name=AXIS,
        in_axes=(None, 0, 0) + (None,) * 8,
        out_axes=(None, None),
        devices=devices,
    )


def stack_members(trees: list):
    """One pytree whose leaves carry a leading member axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member_slice(tree, index: int):
    """Member ``index``'s pytree out of a stacked one."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


@dataclass
class _Run:
    """The host side of a population run."""

    members: list[Member]
    datasets: list[Dataset]
    checkpoints: list[Checkpoints]
    logs: list[MetricsLog | None]
    first_epochs: list[int]
    status: list[str]  # "training", "finished", "stopped early" or "diverged"
    messages: list[str]
    devices: int  # this process's devices: each host's share of a batch is split over them
    dtype: type
    stopping: list[EarlyStopping] = field(default_factory=list)


def train_population(
    base: TrainConfig, grid: list[dict], *, allow_changes: bool = False
) -> list[dict]:
    """Train the members of ``grid`` over ``base`` in one program; returns the summary rows.

    Resuming: each member continues from its own latest checkpoint (members saved at different
    epochs by a killed run catch up), ending as an uninterrupted population does. A workdir
    that holds another population is refused (SettingsError naming the difference), as is a
    member whose saved settings differ unless ``allow_changes``.
    """
    members = population_members(base, grid)
    for member in members:
        check_config(member.config)
    devices = training_devices(base)
    distinct_data = {_data_settings(member.config): member.config for member in members}
    for config in distinct_data.values():
        check_training_data(config)
    primary = jax.process_index() == 0
    workdir = Path(base.workdir)
    lock = exclusive_lock(workdir, "training run") if primary else contextlib.nullcontext()
    with lock, contextlib.ExitStack() as closing:
        saved = _saved_population(workdir, members)
        checkpoints = []
        for member in members:
            checkpoints.append(Checkpoints(member.config.workdir, base.keep_checkpoints))
            closing.callback(checkpoints[-1].close)
            if not allow_changes:
                check_resumable(checkpoints[-1].latest_meta(), member.config)
        status = [saved.get(m.name, {}).get("status", "training") for m in members]
        status = ["training" if s == "finished" else s for s in status]  # more epochs, maybe
        messages = [saved.get(m.name, {}).get("message", "") for m in members]
        if primary:
            for member in members:
                write_run_files(member.config)
        run = _Run(
            members=members,
            datasets=[],
            checkpoints=checkpoints,
            logs=[],
            first_epochs=[0] * len(members),
            status=status,
            messages=messages,
            devices=base.devices,
            dtype=DTYPES[base.dtype],
        )
        _write_population_json(workdir, base, run, primary)
        return _train(base, run, devices, primary)


def _saved_population(workdir: Path, members: list[Member]) -> dict[str, dict]:
    """The saved members by name; SettingsError when the workdir holds another population."""
    path = workdir / POPULATION_FILE
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    before = {m["name"]: m["settings"] for m in saved["members"]}
    now = {m.name: _settings_json(m.settings) for m in members}
    if before != now:
        gone = sorted(set(before) - set(now))
        new = sorted(set(now) - set(before))
        detail = "; ".join(
            part
            for part in (
                f"members not asked for now: {', '.join(gone)}" if gone else "",
                f"new members: {', '.join(new)}" if new else "",
            )
            if part
        )
        raise SettingsError(
            f"{workdir} holds another population ({detail or 'other settings'}): "
            "use another --workdir"
        )
    return {m["name"]: m for m in saved["members"]}


def _write_population_json(workdir: Path, base: TrainConfig, run: _Run, primary: bool) -> None:
    if not primary:
        return
    shared = {k: v for k, v in config_json(base).items() if k not in MEMBER_KEYS}
    document = {
        "shared": shared,
        "members": [
            {
                "name": member.name,
                "settings": _settings_json(member.settings),
                "workdir": member.config.workdir,
                "status": run.status[i],
                "message": run.messages[i],
            }
            for i, member in enumerate(run.members)
        ],
    }
    write_atomic(workdir / POPULATION_FILE, json.dumps(document, indent=2) + "\n")


def _data_settings(config: TrainConfig) -> tuple:
    """What a member's data check depends on (members that share it are checked once)."""
    return config.data, config.defect_classes, config.classes, config.protocol, config.seed


def _train(base: TrainConfig, run: _Run, devices: list, primary: bool) -> list[dict]:
    run.datasets = [load_dataset(member.config) for member in run.members]
    shapes = {ds.train_images.shape[1:] for ds in run.datasets}
    if len(shapes) > 1:
        raise SettingsError(f"the members' images have several sizes {sorted(shapes)}")
    for member, dataset in zip(run.members, run.datasets, strict=True):
        if len(dataset.train_images) < base.batch_size:
            raise SettingsError(
                f"member {member.name}: {len(dataset.train_images)} training images, fewer "
                f"than one batch of {base.batch_size}"
            )
    steps_per_epoch = [len(ds.train_images) // base.batch_size for ds in run.datasets]
    model = CheapNet(base.features, impl=base.impl, bn_axis_name=AXIS)
    replicated = replicated_sharding(devices)
    states = []
    run.stopping = []
    for i, member in enumerate(run.members):
        optimizer = make_optimizer(member.config, steps_per_epoch[i])
        state = initial_state(member.config, model, optimizer)
        restored = run.checkpoints[i].restore_latest(state, replicated)
        meta = None
        if restored is not None:
            state, meta = restored
            run.first_epochs[i] = int(meta["epoch"]) + 1
        states.append(state)
        run.stopping.append(EarlyStopping.resumed(member.config.patience, meta))
    if primary and any(run.first_epochs):
        print(f"resumed from {base.workdir} at epochs {_epoch_ranges(run)}")
    stacked = jax.device_put(stack_members(states), replicated)

    configs = [member.config for member in run.members]
    for config in configs:
        check_crop_size(config.crop_size, run.datasets[0])
    shared = SharedSettings(
        base.gamma,
        base.milestones,
        tuple(sorted({config.loss for config in configs})),
        base.pos_weight,
        any(config.augment or config.crop_size for config in configs),
        _one(configs, "crop_size"),
    )
    hyper = (
        np.array([c.lr for c in configs], run.dtype),
        np.array(steps_per_epoch, np.int32),
        np.array([shared.loss_names.index(c.loss) for c in configs], np.int32),
    )
    augmentation = (
        np.array([c.seed for c in configs], np.int32),
        np.stack([augmentation_flags(c.augment) for c in configs]),
        np.array([ds.mean for ds in run.datasets], run.dtype),
        np.array([ds.std for ds in run.datasets], run.dtype),
    )
    train_step = parallel_population_step(model, shared, devices)
    eval_step = parallel_eval_step(
        jax.vmap(make_eval_step(CheapNet(base.features, impl=base.impl))), devices
    )
    run.logs = [MetricsLog(Path(m.config.workdir)) if primary else None for m in run.members]
    try:
        for epoch in range(min(run.first_epochs), base.epochs):
            taking_part = [
                run.status[i] == "training" and epoch >= run.first_epochs[i]
                for i in range(len(run.members))
            ]
            if not any(taking_part):
                continue
            stacked, losses = _train_epoch(
                base, run, stacked, train_step, hyper, augmentation, epoch, steps_per_epoch,
                taking_part, primary,
            )  # fmt: skip
            counts = _validation_counts(eval_step, stacked, run, base.batch_size)
            scores = [
                (_finish_member_epoch(run, i, stacked, epoch, losses[i], counts[i]), name)
                for i, name in enumerate(m.name for m in run.members)
                if taking_part[i] and run.status[i] == "training"
            ]
            if primary and scores:
                _report_epoch(base, epoch, scores)
        for i in range(len(run.members)):
            if run.status[i] == "training":
                run.status[i] = "finished"
    finally:
        _write_population_json(Path(base.workdir), base, run, primary)
        for log in run.logs:
            if log is not None:
                log.close()
    rows = summary_rows(run.members, run.status)
    if primary:
        for log in run.logs:
            log.plot()
        _write_summary(Path(base.workdir), rows)
    return rows


def _one(configs: list[TrainConfig], name: str):
    """The setting all members share; SettingsError naming it where they differ."""
    values = {getattr(config, name) for config in configs}
    if len(values) > 1:
        raise SettingsError(f"the members' {name} differ ({sorted(values)}): it must be one")
    return values.pop()


def _epoch_ranges(run: _Run) -> str:
    epochs = sorted(set(run.first_epochs))
    return ", ".join(str(e) for e in epochs)


def _train_epoch(
    base,
    run,
    stacked,
    train_step,
    hyper,
    augmentation,
    epoch,
    steps_per_epoch,
    taking_part,
    primary,
):
    """One epoch of every member taking part; returns the state and each member's mean loss."""
    batch = base.batch_size
    orders = [
        training_order(m.config, ds, epoch, steps)
        for m, ds, steps in zip(run.members, run.datasets, steps_per_epoch, strict=True)
    ]
    steps = max(s for s, part in zip(steps_per_epoch, taking_part, strict=True) if part)

    def prepare(index: int):
        xs, ys, active = [], [], np.zeros(len(run.members), bool)
        for i, dataset in enumerate(run.datasets):
            active[i] = taking_part[i] and index < steps_per_epoch[i]
            # A member sitting this step out still needs a batch of the right shape.
            rows = (
                orders[i][index * batch : (index + 1) * batch] if active[i] else orders[i][:batch]
            )
            x, y = training_batch(dataset, rows, run.devices, run.dtype)
            xs.append(x)
            ys.append(y)
        return np.stack(xs, axis=1), np.stack(ys, axis=1), active

    losses: list[list[float]] = [[] for _ in run.members]
    progress = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{base.epochs}",
        unit="step",
        disable=not (base.progress and primary),
        leave=False,
    )
    outputs: list[dict] = []  # step outputs still on the device
    flags: list[tuple[np.ndarray, int]] = []  # (active members, step index) of each
    first_step = epoch * np.array(steps_per_epoch) + 1  # each member's first step this epoch
    for index, (x, y, active) in enumerate(data.threaded_map(prepare, range(steps), 1, ahead=2)):
        # A member found diverged at the last log point sits out from here on.
        active &= np.array([status == "training" for status in run.status])
        stacked, out = train_step(stacked, x, y, *hyper, active, *augmentation)
        outputs.append(out)
        flags.append((active, index))
        if len(outputs) < LOG_EVERY and index + 1 < steps:
            continue
        # A log point: the one host sync for the steps since the last one.
        for checked, (was_active, step_index) in zip(jax.device_get(outputs), flags, strict=True):
            _check_members(run, checked, was_active, epoch, first_step + step_index, losses)
        progress.update(len(outputs))
        outputs, flags = [], []
        progress.set_postfix(members=sum(status == "training" for status in run.status))
    progress.close()
    return stacked, [
        float(np.mean(member_losses)) if member_losses else math.nan for member_losses in losses
    ]


def _check_members(run, checked, active, epoch, steps, losses) -> None:
    for i, member in enumerate(run.members):
        if not active[i] or run.status[i] != "training":
            continue
        loss = float(checked["loss"][i])
        lr = learning_rate_at(member.config, epoch)
        message = divergence(
            loss, bool(checked["finite"][i]), member.config.workdir, epoch, int(steps[i]), lr
        )
        if message is None:
            losses[i].append(loss)
            continue
        run.status[i] = "diverged"
        run.messages[i] = message
        print(f"member {member.name} stopped: {message}; the other members go on", file=sys.stderr)


def _validation_counts(eval_step, stacked, run: _Run, batch: int) -> list[metrics.ConfusionCounts]:
    """Every member's counts over its validation split (padded batches masked)."""
    sizes = [len(ds.validation_images) for ds in run.datasets]
    totals = [metrics.ConfusionCounts(0, 0, 0, 0) for _ in run.members]
    for start in range(0, max(sizes), batch):
        per_member = [
            validation_batch(
                ds.validation_images,
                ds.validation_masks,
                start,
                batch,
                run.devices,
                ds.mean,
                ds.std,
                run.dtype,
            )
            for ds in run.datasets
        ]
        # (x, masks, valid), each [devices, members, b, ...]
        stacked_batch = [np.stack(parts, axis=1) for parts in zip(*per_member, strict=True)]
        counts = np.asarray(eval_step(stacked, *stacked_batch))
        totals = [
            total + metrics.counts_from_array(c) for total, c in zip(totals, counts, strict=True)
        ]
    return totals


def _finish_member_epoch(run, i, stacked, epoch, train_loss, counts) -> float:
    """Member ``i``'s epoch record and checkpoints, as its solo run writes them; returns its
    validation mIoU."""
    member = run.members[i]
    state = member_slice(stacked, i)
    figures = epoch_figures(member.config, epoch, state, train_loss, counts)
    stopping = run.stopping[i]
    stopping.update(epoch, figures["validation"]["iou_defect"])
    figures["early_stopping"] = stopping.as_json()
    if stopping.stopped:
        run.status[i] = "stopped early"
        run.messages[i] = stopping.message()
    if run.logs[i] is not None:
        run.logs[i].write(figures)
    run.checkpoints[i].save(state, checkpoint_meta(figures, member.config, run.datasets[i]))
    return figures["validation"]["miou"]


def _report_epoch(base: TrainConfig, epoch: int, scores: list[tuple[float, str]]) -> None:
    """One line per epoch: the range of the members' validation mIoU and the best member."""
    best, name = max(scores)
    print(
        f"epoch {epoch + 1}/{base.epochs}: {len(scores)} members, validation mIoU "
        f"{min(scores)[0]:.4f}..{best:.4f} (best {name})"
    )


def _metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


SUMMARY_COLUMNS = ("member", "settings", "status", "best_epoch", "miou", "iou_defect")


def summary_rows(members: list[Member], status: list[str]) -> list[dict]:
    """A row per member: its settings, status and best validation epoch (from metrics.jsonl,
    so that resumed epochs count)."""
    rows = []
    for member, member_status in zip(members, status, strict=True):
        records = _metric_rows(Path(member.config.workdir))
        best = max(records, key=lambda r: r["validation"]["miou"], default=None)
        rows.append(
            {
                "member": member.name,
                "settings": " ".join(
                    f"{k}={_value_name(k, v)}" for k, v in member.settings.items()
                ),
                "status": member_status,
                "best_epoch": None if best is None else best["epoch"] + 1,
                "miou": None if best is None else best["validation"]["miou"],
                "iou_defect": None if best is None else best["validation"]["iou_defect"],
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """The summary as an aligned text table."""

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [list(SUMMARY_COLUMNS)] + [[cell(row[c]) for c in SUMMARY_COLUMNS] for row in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(SUMMARY_COLUMNS))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def _write_summary(workdir: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(workdir / SUMMARY_FILE, buffer.getvalue())
    print(format_summary(rows))
    print(f"written: {workdir / SUMMARY_FILE}, {workdir / POPULATION_FILE}")
