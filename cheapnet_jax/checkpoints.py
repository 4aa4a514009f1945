"""Checkpoints: the orbax writer of a training run and one reader for every consumer.

A training workdir holds ``checkpoints/latest/<step>`` and ``checkpoints/best/<step>``, each
with items ``model`` (params, batch_stats), ``meta`` (JSON: epoch, config, normalisation,
metrics) and, in ``latest``, ``opt`` (step, optimizer state).

Where a checkpoint was made does not matter where it is read. Arrays are written as host
numpy arrays, which carry no device layout; and every restore names its target placement (one
local device of the reading process for inference, the reading run's own mesh for a resumed
training run), because restoring a jax.Array without one makes orbax rebuild the writer's mesh
of N devices, which fails ("Topology mismatch") or waits on devices that never join. Older
checkpoints, written as sharded jax.Arrays, are read the same way.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cheapnet_jax.data import CLASS6_MEAN, CLASS6_STD
from cheapnet_jax.errors import CheckpointError
from cheapnet_jax.model import CheapNet, Impl, init_variables
from cheapnet_jax.torch_import import load_torch_checkpoint

CHECKPOINT_DIR = "checkpoints"
POPULATION_FILE = "population.json"
"""A population workdir's record of its members (`cheapnet_jax.population`)."""
MEMBERS_DIR = "members"
"""Where a population workdir keeps its members' runs, one folder each, named as the member."""


@dataclass(frozen=True)
class Normalization:
    """``(pixel / 255 - mean) / std``; defaults are the authors' Class-6 statistics."""

    mean: float = CLASS6_MEAN
    std: float = CLASS6_STD


AUTHORS_NORMALIZATION = Normalization()
"""The statistics the authors used for every class (and the default for their checkpoints)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model with its variables, where they came from, and what its training recorded."""

    model: CheapNet
    variables: dict
    source: str
    normalization: Normalization | None = None
    image_size: int | None = None
    training: dict | None = None  # a workdir's TrainConfig, as written in its config.json


def placed(abstract_tree, sharding: jax.sharding.Sharding, dtype=None):
    """Restore targets: every leaf's shape (and ``dtype``, else its own) on ``sharding``."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            leaf.shape,
            dtype if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype,
            sharding=sharding,
        ),
        abstract_tree,
    )


def first_nonfinite_key(tree) -> str | None:
    """The path of the first leaf holding NaN or inf, None when every value is finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return jax.tree_util.keystr(path)
    return None


def _manager_options(keep: int, name: str) -> ocp.CheckpointManagerOptions:
    # Under several processes both managers synchronise through barriers named after the
    # step; a prefix per manager keeps the two saves of one step apart (and the saves run
    # one after the other: together they would wait on each other's barriers).
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
    )


class Checkpoints:
    """The latest N states and the best by validation mIoU, written atomically by orbax.

    Two managers: ``latest`` keeps the last N epochs, ``best`` keeps ``model`` and ``meta`` of
    the best epoch, written only when the validation mIoU improves (one manager with
    ``best_fn`` would keep the N best and could delete the latest). Under `jax.distributed`
    every process calls `save`; orbax has one process write each replicated array.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int):
        root = Path(workdir).absolute() / CHECKPOINT_DIR
        options = _manager_options(keep, "latest")
        self.latest = ocp.CheckpointManager(root / "latest", options=options)
        self.best = ocp.CheckpointManager(root / "best", options=_manager_options(1, "best"))
        self.best_miou = -math.inf

    def save(self, state, meta: dict) -> None:
        """Write ``state`` (a TrainState) with ``meta``; also as the best when it improved."""
        step = int(state.step)
        score = meta["validation"]["miou"]
        improved = math.isfinite(score) and score > self.best_miou
        if improved:
            self.best_miou = score
        meta = {**meta, "best_miou": self.best_miou}
        # Saved as host numpy arrays: what pmap returns is replicated over this process's
        # devices only, which orbax cannot write under several processes, and a numpy array
        # records no device layout that a reader would have to match. Orbax writes numpy
        # arrays from process 0 alone.
        model = ocp.args.StandardSave(
            jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        )
        opt = ocp.args.StandardSave(
            jax.device_get({"step": state.step, "opt_state": state.opt_state})
        )
        self.latest.save(
            step, args=ocp.args.Composite(model=model, opt=opt, meta=ocp.args.JsonSave(meta))
        )
        self.latest.wait_until_finished()
        if improved:
            self.best.save(step, args=ocp.args.Composite(model=model, meta=ocp.args.JsonSave(meta)))
            self.best.wait_until_finished()

    def latest_meta(self) -> dict | None:
        """The ``meta`` of the latest saved epoch, None when nothing was saved yet."""
        step = self.latest.latest_step()
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore_latest(self, abstract_state, sharding: jax.sharding.Sharding):
        """``(state, meta)`` of the latest epoch placed on ``sharding``, or None.

        ``abstract_state`` gives the structure, shapes and dtypes (a TrainState of arrays or
        ShapeDtypeStructs); the device count that wrote the checkpoint does not matter.
        """
        step = self.latest.latest_step()
        if step is None:
            return None
        target = placed(abstract_state, sharding)
        _quiet_failed_restores()
        try:
            restored = self.latest.restore(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(
                        {"params": target.params, "batch_stats": target.batch_stats}
                    ),
                    opt=ocp.args.StandardRestore(
                        {"step": target.step, "opt_state": target.opt_state}
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax and tensorstore raise many types for damaged files
            raise CheckpointError(
                f"{self.latest.directory / str(step)}: cannot resume from this checkpoint "
                f"({type(err).__name__}: {_first_words(err)})"
            ) from err
        meta = restored["meta"]
        if meta.get("best_miou") is not None and math.isfinite(meta["best_miou"]):
            self.best_miou = meta["best_miou"]
        state = abstract_state.replace(
            step=restored["opt"]["step"],
            params=restored["model"]["params"],
            batch_stats=restored["model"]["batch_stats"],
            opt_state=restored["opt"]["opt_state"],
        )
        return state, meta

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _step_folder(path: Path) -> tuple[Path, int | None] | None:
    """``(manager directory, step or None for its latest)`` that ``path`` points to."""
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
            if folder.name.isdigit():
                return folder.parent, int(folder.name)
            continue
        if any(p.name.isdigit() and p.is_dir() for p in folder.iterdir()):
            return folder, None
    return None


def _restore_dtype(meta: dict):
    """float64 where the run trained in float64 and this process has x64 enabled."""
    if meta["config"].get("dtype") == "float64" and jax.config.jax_enable_x64:
        return jnp.float64
    return jnp.float32


_QUIET = False


class _FailedRestoreEcho(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for the other reads of a restore
    that already failed: the CheckpointError reports the first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Future exception was never retrieved")


def _quiet_failed_restores() -> None:
    """When a restore fails, orbax's other pending reads finish on a closed event loop and
    report "Event loop is closed" (as unraisable exceptions) and their own errors (through
    asyncio's log): dozens of tracebacks around the one-line CheckpointError. Drop exactly those
    echoes, for the rest of the process (installed once, before the first restore)."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_FailedRestoreEcho())


def _first_words(err: Exception, limit: int = 200) -> str:
    """The start of an error's message: tensorstore appends kilobytes of JSON specs."""
    text = str(err).split(" [tensorstore_spec")[0].strip()
    return text if len(text) <= limit else text[:limit] + "..."


def load_orbax_checkpoint(
    path: str | os.PathLike, *, impl: Impl = "auto", device: jax.Device | None = None
) -> tuple[CheapNet, dict, dict]:
    """``(model, variables, meta)`` from a workdir, its ``checkpoints`` folder, or one step.

    A workdir gives its best checkpoint (the latest when none has a validation score). The
    variables are placed on ``device`` (default: this process's first local device), whatever
    number of devices or processes trained them.
    """
    path = Path(path).absolute()
    found = _step_folder(path)
    if found is None:
        raise CheckpointError(f"{path}: no orbax checkpoint of cheapnet-jax found there")
    directory, step = found
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    _quiet_failed_restores()
    try:
        with ocp.CheckpointManager(directory) as manager:
            if step is None:
                step = manager.latest_step()
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = manager.restore(step, args=args)["meta"]
            model = CheapNet(int(meta["config"]["features"]), impl=impl)
            abstract = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
            target = placed(abstract, sharding, _restore_dtype(meta))
            restored = manager.restore(
                step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))
            )
    except Exception as err:  # orbax and tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{directory / str(step)}: cannot read this checkpoint ({type(err).__name__}: "
            f"{_first_words(err)})"
        ) from err
    return model, dict(restored["model"]), meta


def load_checkpoint(path: str | os.PathLike, impl: Impl = "auto") -> LoadedModel:
    """An authors' ``.pkl`` or a cheapnet-jax orbax checkpoint (a workdir or a step folder).

    A checkpoint holding NaN or inf is refused (CheckpointError naming the first such key):
    its masks would be meaningless, and a NaN probability never exceeds the threshold, so
    every part would pass.
    """
    if Path(path).is_dir():
        model, variables, meta = load_orbax_checkpoint(path, impl=impl)
        stats = meta.get("normalization", {})
        normalization = Normalization(stats["mean"], stats["std"]) if stats else None
        source = f"{path} (epoch {int(meta['epoch']) + 1}, step {meta['step']})"
        synthetic = meta["config"]["data"] == "synthetic"
        image_size = meta["config"].get("image_size") if synthetic else None
        loaded = LoadedModel(model, variables, source, normalization, image_size, meta["config"])
    else:
        model, variables = load_torch_checkpoint(path, impl=impl)
        loaded = LoadedModel(model, variables, str(path))
    bad_key = first_nonfinite_key(loaded.variables)
    if bad_key is not None:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf), first in {bad_key}")
    return loaded


def calibration_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's calibration (`cheapnet_jax.calibration`) is kept: in a workdir,
    ``calibration.json``; beside a ``.pkl``, ``<name>.calibration.json``."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / "calibration.json"
    return path.with_name(path.name + ".calibration.json")


def population_members(path: str | os.PathLike) -> dict[str, Path] | None:
    """A population workdir's members by name, in the order of its ``population.json``: each
    member's run folder (``members/<name>``, wherever the workdir now is); None when ``path``
    is not a population workdir."""
    record = Path(path) / POPULATION_FILE
    if not record.is_file():
        return None
    try:
        names = [member["name"] for member in json.loads(record.read_text())["members"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{record}: not a population record ({err})") from err
    return {name: Path(path) / MEMBERS_DIR / name for name in names}
