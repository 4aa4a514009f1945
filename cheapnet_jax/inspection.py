"""One engine from a checkpoint and images to defects: `Inspector`.

    from cheapnet_jax import Inspector

    inspector = Inspector.load("runs/demo")     # a run folder, a population member, a .pkl
    results = inspector.inspect(images)         # uint8 [H, W] arrays of any sizes
    print(results[0].verdict, results[0].defects)

predict.py, the inspection service, evaluate.py and the export's parity report all inspect
through it, so an image gets the same answer from each. What it decides, once:

- settings: ``threshold`` and ``min_area`` as given, else the checkpoint's calibration, else
  0.5 and 0; the normalisation as given, else the checkpoint's training statistics, else the
  authors' (`Inspector.settings` says where each came from);
- images of one size go through the detector together, padded by reflection to a multiple of
  16 and their probabilities cropped back, the batch padded to a power of two
  (`compiled_batch_size`) so that few programs are compiled;
- on the CPU with OpenCV, small models run the network alone on the device and label on the
  host (`detection.labels_on_host`: the detector's very arrays), so that the labeling of one
  batch overlaps the network of the next; elsewhere the whole detector is one program;
- images of more than ``tile_above`` pixels (or all, with ``tile``) go through the exact tiler
  one at a time (`tiling.detect_tiled`); their masks are kept only up to ``tile_above`` pixels.

A copy of the weights lives on each local device, so that one thread per device can run
batches side by side (the service's workers; on the CPU, programs take turns: `CPU_PROGRAMS`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from cheapnet_jax import data
from cheapnet_jax.calibration import Setting, resolve_settings
from cheapnet_jax.checkpoints import (
    AUTHORS_NORMALIZATION,
    LoadedModel,
    Normalization,
    calibration_path,
    load_checkpoint,
    population_members,
)
from cheapnet_jax.data import pad_to_multiple
from cheapnet_jax.detection import (
    Detections,
    detections_on_host,
    labels_on_host,
    make_detector,
    make_network,
)
from cheapnet_jax.errors import UnknownModelError
from cheapnet_jax.members import (
    make_member_detector,
    make_member_network,
    member_batch_size,
    member_batch_sizes,
    normalization_tables,
    stack_members,
)
from cheapnet_jax.model import VARIANTS, Impl
from cheapnet_jax.tiling import DEFAULT_TILE, TiledDetections, detect_tiled, make_tile_detector

DEFAULT_THRESHOLD, DEFAULT_MIN_AREA = 0.5, 0
"""Without a given setting and a calibration."""

CPU_PROGRAMS = threading.Lock()
"""Held by every inspector of the process while a detector program runs on the CPU. There the
labeler runs in a host callback, and two programs with host callbacks executing at once on
XLA:CPU can deadlock (jax 0.10; 2 CPU devices, or 2 threads on one, such as a request served
during the warm-up: both callbacks wait for the copy of their inputs jax makes before calling
them). The deadlock is the process's, not one inspector's, so the lock is too. CPU devices
share the same cores anyway; accelerators (union-find labeler, no callback) run side by side."""

DETECTOR_CACHE = 8
"""Compiled detectors kept for settings other than the defaults (least recently used dropped
first), so that many distinct thresholds cannot fill the memory with programs."""

FILE_BATCHES_AHEAD = 2
"""`Inspector.inspect_files`: batches inspected ahead of the consumer (bounded memory)."""


class Defect(NamedTuple):
    """One defect: its ``box`` ``(x1, y1, x2, y2)`` with inclusive corners, its ``area`` in
    pixels and its ``score``, the mean probability inside it (rounded to 6 digits, as
    predict.py writes it)."""

    box: tuple[int, int, int, int]
    area: int
    score: float

    def as_dict(self) -> dict:
        """The JSON form of predict.py's records and the service's answers."""
        return {"box": list(self.box), "area": self.area, "score": self.score}


def make_defect(box: Iterable, area, score) -> Defect:
    """A `Defect` of numpy values."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return Defect((x1, y1, x2, y2), int(area), round(float(score), 6))


@dataclass
class Result:
    """One image's answer.

    ``defects`` in raster order of their first pixel; ``components_left_out``: defects beyond
    ``max_components``, counted but not listed; ``mask`` (bool ``[H, W]``) and
    ``probabilities`` (float32 ``[H, W]``) where asked for; ``tiles``: how many tiles ran, for
    an image inspected in tiles (else None), and ``parts_left_out``: tile components beyond a
    tile's own cap; ``warning``: how a file was read (colour converted to grayscale);
    ``error``: why a file could not be inspected (then there is nothing else); ``image``: the
    pixels read from a file, where asked for (`Inspector.inspect_files`); ``model``: the name
    of the model that answered.
    """

    height: int
    width: int
    defects: list[Defect]
    components_left_out: int = 0
    mask: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    tiles: int | None = None
    parts_left_out: int = 0
    warning: str | None = None
    error: str | None = None
    image: np.ndarray | None = None
    model: str | None = None

    @property
    def verdict(self) -> str:
        """``"NG"`` when the image has a defect, ``"OK"`` when not, ``"ERROR"`` when it could
        not be inspected."""
        if self.error is not None:
            return "ERROR"
        return "NG" if self.defects else "OK"


@dataclass(frozen=True)
class InspectorOptions:
    """How an inspector runs (the keyword arguments of `Inspector.load`, named as the
    command-line flags)."""

    batch_size: int = 8  # images per device call (the service's --max-batch)
    max_components: int = 256
    dtype: str = "float32"
    tile: int | None = None  # inspect every image in tiles of this size (a multiple of 16)
    tile_above: int = 2048 * 2048  # ... else images of more pixels, in tiles of DEFAULT_TILE
    # On the CPU with OpenCV, run the network alone and label on the host (the same arrays);
    # False: the whole detector as one program; None: for widths up to
    # `detection.LABELS_ON_HOST_UP_TO`.
    labels_on_host: bool | None = None


def compiled_batch_size(count: int, batch_size: int) -> int:
    """The batch a chunk of ``count`` images runs as: the smallest power of two >= count,
    at most ``batch_size``. A short last batch then costs about its own size instead of a
    full batch of blank images, with at most log2(batch_size) + 1 compiled shapes."""
    return min(batch_size, 1 << max(0, count - 1).bit_length())


def compiled_batch_sizes(batch_size: int) -> list[int]:
    """Every batch size a call of at most ``batch_size`` images runs as (`compiled_batch_size`),
    smallest first: what a warm-up compiles."""
    return sorted({compiled_batch_size(n, batch_size) for n in range(1, batch_size + 1)})


def pad_batch(array: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad axis 0 to ``batch_size`` with zeros, so that batches share compiled shapes."""
    missing = batch_size - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])


def weights_digest(variables: Mapping) -> str:
    """``sha256:<hex>`` of the weights: every array's path, dtype, shape and bytes in path
    order, so the same weights give the same digest whether read from a .pkl or a workdir."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def variant_name(features: int) -> str | None:
    """``S``, ``M`` or ``L`` for their widths, else None."""
    return next((name for name, g in VARIANTS.items() if g == features), None)


def normalization_setting(
    given: Normalization | tuple[float, float] | None, loaded: LoadedModel
) -> Setting:
    """The normalisation as given, else the checkpoint's training statistics
    (``"checkpoint"``), else the authors' Class-6 values (``"default"``)."""
    if given is not None:
        return Setting(Normalization(*given), "given")
    if loaded.normalization is not None:
        return Setting(loaded.normalization, "checkpoint")
    return Setting(AUTHORS_NORMALIZATION, "default")


def detection_settings(
    checkpoint: str | os.PathLike | None,
    threshold: float | None = None,
    min_area: int | None = None,
    calibration: bool = True,
) -> dict[str, Setting]:
    """``threshold`` and ``min_area`` as given (not None), else from the calibration of
    ``checkpoint`` (unless ``calibration`` is false), else 0.5 and 0."""
    calibration_file = (
        calibration_path(checkpoint) if calibration and checkpoint is not None else None
    )
    return resolve_settings(
        {"threshold": threshold, "min_area": min_area},
        {"threshold": DEFAULT_THRESHOLD, "min_area": DEFAULT_MIN_AREA},
        calibration_file,
    )


def as_images(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 ``[H, W]`` images from a list of them or one ``[B, H, W]`` array; ValueError
    naming the first that is not one."""
    if isinstance(images, np.ndarray | jax.Array):
        array = np.asarray(images)
        if array.ndim == 2:
            raise ValueError(
                "images: one [H, W] array; pass a list of images or one [B, H, W] array"
            )
        images = list(array)
    checked = []
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(
                f"images[{index}]: expected uint8 grayscale [H, W], got {image.dtype} "
                f"{list(image.shape)} (convert colour images to grayscale first, as "
                "data.load_image(path, convert_to_grayscale=True) does)"
            )
        if 0 in image.shape:
            raise ValueError(f"images[{index}]: empty image {list(image.shape)}")
        checked.append(image)
    return checked


def batch_results(
    found: Detections,
    count: int,
    shape: tuple[int, int],
    keep_masks: bool = False,
    keep_probabilities: bool = False,
) -> list[Result]:
    """The first ``count`` images' results of a batch's detections (numpy) of images of
    ``shape``."""
    height, width = shape
    results = []
    for index in range(count):
        valid = found.valid[index]
        rows = zip(found.stats[index][valid], found.scores[index][valid], strict=True)
        results.append(
            Result(
                height=height,
                width=width,
                defects=[make_defect(row[:4], row[4], score) for row, score in rows],
                components_left_out=int(found.overflow[index]),
                mask=found.masks[index] if keep_masks else None,
                probabilities=found.probabilities[index] if keep_probabilities else None,
            )
        )
    return results


def _tiled_result(found: TiledDetections, shape: tuple[int, int]) -> Result:
    return Result(
        height=shape[0],
        width=shape[1],
        defects=[make_defect((d.x1, d.y1, d.x2, d.y2), d.area, d.score) for d in found.defects],
        components_left_out=found.overflow,
        mask=found.mask,
        probabilities=found.probabilities,
        tiles=found.tiles,
        parts_left_out=found.parts_left_out,
    )


class Inspector:
    """A checkpoint's detectors on every local device, with its settings; thread-safe, one
    thread per device (on the CPU, one program at a time in the whole process:
    `CPU_PROGRAMS`). Make one with `Inspector.load`."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Mapping[str, Setting] | None = None,
        options: InspectorOptions = InspectorOptions(),
        devices: list | None = None,
        checkpoint: str | os.PathLike | None = None,
        name: str | None = None,
    ):
        """``settings``: `Setting`s of ``threshold``, ``min_area`` and ``normalization`` (a
        `Normalization`); those missing are resolved as `Inspector.load` resolves them
        without arguments. ``checkpoint``: where ``loaded`` came from (its calibration file
        is found beside it). ``name``: the model's (default: the checkpoint's file or folder
        name)."""
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.name = name or (self.checkpoint.name if self.checkpoint else "model")
        self.models: dict[str, Inspector] = {self.name: self}
        self._groups: dict[int, _MemberGroup] = {}  # several models only: by width
        self.loaded = loaded
        self.settings: dict[str, Setting] = dict(settings or {})
        if not {"threshold", "min_area"} <= self.settings.keys():  # the calibration read once
            self.settings = {**detection_settings(self.checkpoint), **self.settings}
        if "normalization" not in self.settings:
            self.settings["normalization"] = normalization_setting(None, loaded)
        self.options = options
        self.devices = devices or jax.local_devices()
        self._variables = [jax.device_put(loaded.variables, d) for d in self.devices]
        self._lock = threading.Lock()
        on_cpu = any(device.platform == "cpu" for device in self.devices)
        self._executing = CPU_PROGRAMS if on_cpu else contextlib.nullcontext()
        self.labels_on_host = labels_on_host(loaded.model.features, on_cpu, options.labels_on_host)
        self._network = make_network(
            loaded.model, dtype=options.dtype, normalization=self._normalization_pair
        )
        self._detectors: collections.OrderedDict = collections.OrderedDict()
        self._tile_detectors: dict = {}

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        *,
        model: str | None = None,
        threshold: float | None = None,
        min_area: int | None = None,
        normalization: Normalization | tuple[float, float] | None = None,
        calibration: bool = True,
        impl: Impl = "auto",
        devices: list | None = None,
        name: str | None = None,
        **options,
    ) -> Inspector:
        """The inspector of a training run's folder (its best checkpoint), a population
        member's folder, an orbax step folder or an authors' ``.pkl``; of a population
        workdir, every member (named as in its ``population.json``), or the one named
        ``model``.

        ``threshold``, ``min_area``: None for each checkpoint's calibration (unless
        ``calibration=False``), else 0.5 and 0. ``normalization``: ``(mean, std)`` of
        pixel/255, None for the checkpoint's own, else the authors'. ``options``: the fields
        of `InspectorOptions` (``batch_size``, ``max_components``, ``dtype``, ``tile``,
        ``tile_above``, ``labels_on_host``).
        """
        settings = dict(
            threshold=threshold,
            min_area=min_area,
            normalization=normalization,
            calibration=calibration,
            impl=impl,
            devices=devices,
            **options,
        )
        members = population_members(checkpoint)
        if members is not None:
            if model is None:
                return cls.load_models(members, **settings)
            if model not in members:
                raise UnknownModelError(
                    f"{checkpoint}: no member {model!r}; its members: {', '.join(members)}"
                )
            return cls.load(members[model], name=model, **settings)
        if model is not None:
            raise UnknownModelError(
                f"{checkpoint}: not a population workdir (no population.json): model={model!r}"
            )
        loaded = load_checkpoint(checkpoint, impl)
        resolved = {
            **detection_settings(checkpoint, threshold, min_area, calibration),
            "normalization": normalization_setting(normalization, loaded),
        }
        return cls(loaded, resolved, InspectorOptions(**options), devices, checkpoint, name)

    @classmethod
    def load_models(cls, checkpoints: Mapping[str, str | os.PathLike], **settings) -> Inspector:
        """One inspector answering with any of ``checkpoints`` (name -> run folder or
        ``.pkl``), each with its own settings (`load`'s keyword arguments apply to all)."""
        models = [cls.load(path, name=name, **settings) for name, path in checkpoints.items()]
        return models[0] if len(models) == 1 else cls.of_models(models)

    @classmethod
    def of_models(cls, models: Sequence[Inspector]) -> Inspector:
        """One inspector answering with any of ``models`` (single-model inspectors with the
        same options and devices, named apart): images for models of one width share
        compiled calls (`cheapnet_jax.members`), each answered with its model's weights,
        normalisation, threshold and minimum area. Its ``loaded``, ``settings`` and the like
        are the first model's."""
        first = models[0]
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError(f"models named alike: {names}")
        if any(m.options != first.options or m.devices != first.devices for m in models):
            raise ValueError("the models' inspectors must share their options and devices")
        inspector = cls.__new__(cls)
        inspector.__dict__.update(
            {key: value for key, value in vars(first).items() if key != "models"}
        )
        inspector.models = {model.name: model for model in models}
        by_width: dict[int, list[Inspector]] = collections.defaultdict(list)
        for model in models:
            by_width[model.loaded.model.features].append(model)
        inspector._groups = {
            features: _MemberGroup.of(members, first.options, first.devices)
            for features, members in by_width.items()
        }
        return inspector

    @functools.cached_property
    def digest(self) -> str:
        """`weights_digest` of the model's weights (computed when first asked)."""
        return weights_digest(self.loaded.variables)

    @property
    def threshold(self) -> float:
        """The default threshold: a pixel is a defect if its probability is above it."""
        return float(self.settings["threshold"].value)

    @property
    def min_area(self) -> int:
        """The default smallest defect, in pixels."""
        return int(self.settings["min_area"].value)

    @property
    def normalization(self) -> Normalization:
        """``(pixel / 255 - mean) / std``, the input the network was trained on."""
        return self.settings["normalization"].value

    @property
    def _normalization_pair(self) -> tuple[float, float]:
        return (self.normalization.mean, self.normalization.std)

    def detector(self, threshold: float, min_area: int):
        """The jitted detector of these settings (made once; see `DETECTOR_CACHE`)."""
        key = (threshold, min_area)
        with self._lock:
            if key in self._detectors:
                self._detectors.move_to_end(key)
                return self._detectors[key]
            made = make_detector(
                self.loaded.model,
                threshold=threshold,
                min_area=min_area,
                max_components=self.options.max_components,
                dtype=self.options.dtype,
                normalization=self._normalization_pair,
            )
            self._detectors[key] = made
            default = (self.threshold, self.min_area)
            others = [k for k in self._detectors if k != default]
            if len(others) > DETECTOR_CACHE:
                del self._detectors[others[0]]
            return made

    def tile_detector(self, threshold: float):
        """The jitted tile detector of this threshold (made once)."""
        with self._lock:
            if threshold not in self._tile_detectors:
                self._tile_detectors[threshold] = make_tile_detector(
                    self.loaded.model,
                    threshold=threshold,
                    dtype=self.options.dtype,
                    normalization=self._normalization_pair,
                )
            return self._tile_detectors[threshold]

    def tiled(self, shape: tuple[int, int]) -> bool:
        """Whether an image of this shape goes through the tiler."""
        return self.options.tile is not None or shape[0] * shape[1] > self.options.tile_above

    def _chosen(self, threshold: float | None, min_area: int | None) -> tuple[float, int]:
        return (
            self.threshold if threshold is None else float(threshold),
            self.min_area if min_area is None else int(min_area),
        )

    def inspect(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        *,
        threshold: float | None = None,
        min_area: int | None = None,
        keep_masks: bool = False,
        keep_probabilities: bool = False,
        model: str | Sequence[str] | None = None,
    ) -> list[Result]:
        """The results of uint8 grayscale images ``[H, W]`` of any sizes (a list, or one
        ``[B, H, W]`` array), in order. ``threshold`` and ``min_area`` override the models'
        settings for this call; ``keep_masks`` and ``keep_probabilities`` keep each image's
        mask and probability map (the heatmap) in its result. ``model``: which model answers,
        one name for all or a name per image (needed where the inspector has several)."""
        images = as_images(images)
        names = self.model_names(model, len(images))
        results: list[Result | None] = [None] * len(images)
        batches: dict[tuple, list[int]] = collections.defaultdict(list)
        for index, image in enumerate(images):
            if self.tiled(image.shape):
                results[index] = self.inspect_tiled(
                    0, image, threshold, min_area, keep_masks, keep_probabilities, names[index]
                )
            else:
                batches[(self.width_of(names[index]), image.shape)].append(index)
        size = self.options.batch_size
        for indices in batches.values():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                found = self.inspect_batch(
                    0,
                    [images[index] for index in chunk],
                    threshold,
                    min_area,
                    keep_masks,
                    keep_probabilities,
                    [names[index] for index in chunk],
                )
                for index, result in zip(chunk, found, strict=True):
                    results[index] = result
        return results

    def model_names(self, model: str | Sequence[str] | None, count: int) -> list[str]:
        """The model of each of ``count`` images: ``model`` (one name, or one per image),
        or the only model; UnknownModelError naming the models for an unknown one."""
        if model is None:
            if len(self.models) > 1:
                raise UnknownModelError(
                    f"several models answer here ({', '.join(self.models)}): name one (model=...)"
                )
            return [self.name] * count
        names = [model] * count if isinstance(model, str) else list(model)
        if len(names) != count:
            raise ValueError(f"model: {len(names)} names for {count} images")
        for name in names:
            if name not in self.models:
                raise UnknownModelError(
                    f"no model {name!r} here; the models: {', '.join(self.models)}"
                )
        return names

    def width_of(self, model: str) -> int:
        """The width G of the model named ``model``."""
        return self.models[model].loaded.model.features

    def inspect_files(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        threshold: float | None = None,
        min_area: int | None = None,
        keep_masks: bool = False,
        keep_probabilities: bool = False,
        keep_images: bool = False,
        decode_threads: int = data.DECODE_THREADS,
        model: str | Sequence[str] | None = None,
    ) -> Iterator[tuple[Path, Result]]:
        """``(path, result)`` of every image file, in order (an error alone, as it is met),
        streaming: threads decode ahead, a thread runs the device's part of each batch and
        another the host's, a bounded number of batches ahead of the consumer. A file that
        cannot be inspected (unreadable, 16-bit, ...) is a result with its ``error``; colour
        images are converted to grayscale with a ``warning``; ``keep_images`` keeps the pixels
        read in each result (for overlays). ``model``: which model answers, one name for all
        or one per path. Stopping the iteration early stops the work."""
        keep = (keep_masks, keep_probabilities)
        batch_size = self.options.batch_size
        paths = [Path(p) for p in paths]
        names = self.model_names(model, len(paths))
        decoded = data.threaded_map(
            _decode, list(zip(paths, names, strict=True)), decode_threads, ahead=2 * batch_size
        )
        ready: queue.Queue = queue.Queue(maxsize=FILE_BATCHES_AHEAD)
        stop = threading.Event()

        def finished(items: list, results: list[Result]) -> Future:
            future: Future = Future()
            future.set_result((items, results))
            return future

        def produce() -> None:
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="inspect-host") as host:
                    groups = _file_groups(decoded, batch_size, self.tiled, self.width_of)
                    for items, in_tiles in groups:
                        if stop.is_set():
                            return
                        if items[0].error is not None:  # an error passes alone
                            error = items[0].error
                            work = finished(items, [Result(0, 0, [], error=error)])
                        elif in_tiles:
                            image, name = items[0].image, items[0].model
                            # masks of tiled images only up to tile_above pixels (image-sized)
                            small = image.size <= self.options.tile_above
                            keep_small = (keep[0] and small, keep[1] and small)
                            result = self.inspect_tiled(
                                0, image, threshold, min_area, *keep_small, name
                            )
                            work = finished(items, [result])
                        else:
                            images = [item.image for item in items]
                            finish = self.start_batch(
                                0, images, threshold, min_area, *keep, [i.model for i in items]
                            )
                            work = host.submit(lambda i=items, f=finish: (i, f()))
                        _put(ready, work, stop)
            except BaseException as err:  # raised in the consumer's thread
                _put(ready, err, stop)
            finally:
                decoded.close()
                _put(ready, None, stop)

        producer = threading.Thread(target=produce, name="inspect-files", daemon=True)
        producer.start()
        try:
            while (work := ready.get()) is not None:
                if isinstance(work, BaseException):
                    raise work
                items, results = work.result()
                for item, result in zip(items, results, strict=True):
                    result.warning = item.warning
                    result.image = item.image if keep_images else None
                    result.model = item.model
                    yield item.path, result
        finally:
            stop.set()
            producer.join()

    def inspect_batch(
        self,
        device: int,
        images: list[np.ndarray],
        threshold: float | None,
        min_area: int | None,
        keep_masks: bool = False,
        keep_probabilities: bool = False,
        models: Sequence[str] | None = None,
    ) -> list[Result]:
        """`start_batch`'s two parts one after the other."""
        return self.start_batch(
            device, images, threshold, min_area, keep_masks, keep_probabilities, models
        )()

    def start_batch(
        self,
        device: int,
        images: list[np.ndarray],
        threshold: float | None,
        min_area: int | None,
        keep_masks: bool = False,
        keep_probabilities: bool = False,
        models: Sequence[str] | None = None,
    ) -> Callable[[], list[Result]]:
        """A batch of same-sized uint8 images ``[H, W]`` (at most ``batch_size``) in two
        parts: the device's, done here on local device ``device``, and the host's, returned
        as a function to call (in any thread) for the results. Where `labels_on_host`, the
        device runs the network alone and the returned function labels and measures the
        masks (`detections_on_host`: the detector's very arrays), so that the next batch's
        network can run meanwhile; elsewhere the device runs the whole detector and the
        function only lists the defects. ``threshold`` and ``min_area``: None for each
        model's own. ``models``: each image's model (of one width), where there are
        several."""
        names = self.model_names(models, len(images))
        if self._groups:
            group = self._groups[self.width_of(names[0])]
            return group.start_batch(
                self, device, images, threshold, min_area, names, keep_masks, keep_probabilities
            )
        threshold, min_area = self._chosen(threshold, min_area)
        batch = _Batch(images, names, self.options, keep_masks, keep_probabilities)
        x = jax.device_put(batch.pixels, self.devices[device])
        if self.labels_on_host:
            with self._executing:
                probabilities = self._network(self._variables[device], x, crop=batch.shape)
                probabilities = np.asarray(jax.device_get(probabilities))
            return lambda: batch.labeled_on_host(probabilities, threshold, min_area)
        detector = self.detector(threshold, min_area)
        with self._executing:
            found = batch.fetched(detector(self._variables[device], x, crop=batch.shape))
        return lambda: batch.results(found)

    def inspect_tiled(
        self,
        device: int,
        image: np.ndarray,
        threshold: float | None,
        min_area: int | None,
        keep_masks: bool = False,
        keep_probabilities: bool = False,
        model: str | None = None,
    ) -> Result:
        """The result of one image in exact tiles (`tiling.detect_tiled`) of ``tile`` pixels
        (`DEFAULT_TILE` when not set), on local device ``device``, by ``model`` (where there
        are several). ``threshold`` and ``min_area``: None for the model's own."""
        name = self.model_names(model, 1)[0]
        if name != self.name or self._groups:
            answering = self.models[name]
            return answering.inspect_tiled(
                device, image, threshold, min_area, keep_masks, keep_probabilities
            )
        threshold, min_area = self._chosen(threshold, min_area)
        keep_maps = keep_masks or keep_probabilities
        with self._executing, jax.default_device(self.devices[device]):
            found = detect_tiled(
                self.tile_detector(threshold),
                self._variables[device],
                image,
                tile=self.options.tile or DEFAULT_TILE,
                max_components=self.options.max_components,
                min_area=min_area,
                keep_maps=keep_maps,
            )
        result = _tiled_result(found, image.shape)
        result.mask = result.mask if keep_masks else None
        result.probabilities = result.probabilities if keep_probabilities else None
        result.model = self.name
        return result

    def warm(self, shape: tuple[int, int]) -> None:
        """Compile the default settings' programs for images of ``shape`` on every device, at
        every batch size a call can run as (powers of two up to ``batch_size``); for every
        width where there are several models."""
        if self._groups and not self.tiled(shape):
            for group in self._groups.values():
                group.warm(self, shape)
            return
        if self._groups:
            for model in self.models.values():
                model.warm(shape)
            return
        if self.tiled(shape):
            blank = np.zeros(shape, np.uint8)
            for device in range(len(self.devices)):
                self.inspect_tiled(device, blank, self.threshold, self.min_area)
            return
        for device in range(len(self.devices)):
            for size in compiled_batch_sizes(self.options.batch_size):
                blank = [np.zeros(shape, np.uint8)] * size
                self.inspect_batch(device, blank, self.threshold, self.min_area)


@dataclass
class _MemberGroup:
    """The models of one width of a several-model inspector, run as one (`members`): their
    weights stacked on a member axis (a copy per device), their normalisation tables, their
    thresholds and minimum areas, and the programs that take a member index per image."""

    names: list[str]
    index: dict[str, int]
    variables: list  # stacked, one copy per device
    tables: list  # float32 [M, 256], one copy per device
    thresholds: np.ndarray  # float32 [M]
    min_areas: np.ndarray  # int32 [M]
    labels_on_host: bool
    network: Callable
    detector: Callable

    @classmethod
    def of(
        cls, models: Sequence[Inspector], options: InspectorOptions, devices: list
    ) -> _MemberGroup:
        stacked = stack_members([m.loaded.variables for m in models])
        tables = normalization_tables([(m.normalization.mean, m.normalization.std) for m in models])
        model = models[0].loaded.model
        return cls(
            names=[m.name for m in models],
            index={m.name: i for i, m in enumerate(models)},
            variables=[jax.device_put(stacked, d) for d in devices],
            tables=[jax.device_put(tables, d) for d in devices],
            thresholds=np.array([m.threshold for m in models], np.float32),
            min_areas=np.array([m.min_area for m in models], np.int32),
            labels_on_host=models[0].labels_on_host,
            network=make_member_network(model, dtype=options.dtype),
            detector=make_member_detector(
                model, max_components=options.max_components, dtype=options.dtype
            ),
        )

    def start_batch(
        self,
        inspector: Inspector,
        device: int,
        images: list[np.ndarray],
        threshold: float | None,
        min_area: int | None,
        names: list[str],
        keep_masks: bool,
        keep_probabilities: bool,
    ) -> Callable[[], list[Result]]:
        """`Inspector.start_batch` of images answered by these members."""
        member = np.array([self.index[name] for name in names], np.int32)
        count = len(images)
        thresholds = self.thresholds[member] if threshold is None else np.full(count, threshold)
        min_areas = self.min_areas[member] if min_area is None else np.full(count, min_area)
        thresholds = thresholds.astype(np.float32)
        min_areas = min_areas.astype(np.int32)
        batch = _Batch(
            images, names, inspector.options, keep_masks, keep_probabilities, member_batch_size
        )
        size = len(batch.pixels)
        on_device = jax.device_put(
            (batch.pixels, pad_batch(member, size), np.int32(count)), inspector.devices[device]
        )
        weights, tables = self.variables[device], self.tables[device]
        if self.labels_on_host:
            with inspector._executing:
                probabilities = self.network(weights, tables, *on_device, crop=batch.shape)
                probabilities = np.asarray(jax.device_get(probabilities))
            return lambda: batch.labeled_on_host(
                probabilities, thresholds[:, None, None], min_areas[:, None]
            )
        limits = jax.device_put(
            (pad_batch(thresholds, size), pad_batch(min_areas, size)), inspector.devices[device]
        )
        with inspector._executing:
            found = self.detector(weights, tables, *on_device, *limits, crop=batch.shape)
            found = batch.fetched(found)
        return lambda: batch.results(found)

    def warm(self, inspector: Inspector, shape: tuple[int, int]) -> None:
        """Compile the programs for images of ``shape`` at the batch sizes they run
        (`member_batch_sizes`), on every device."""
        for device in range(len(inspector.devices)):
            for size in member_batch_sizes(inspector.options.batch_size):
                blank = [np.zeros(shape, np.uint8)] * size
                names = [self.names[i % len(self.names)] for i in range(size)]
                self.start_batch(inspector, device, blank, None, None, names, False, False)()


class _Batch:
    """A batch of same-sized images on its way through `Inspector.start_batch`: its pixels
    padded to a multiple of 16 and to its compiled batch size, and what its results keep."""

    def __init__(
        self,
        images: list[np.ndarray],
        names: Sequence[str],
        options: InspectorOptions,
        keep_masks: bool,
        keep_probabilities: bool,
        batch_size: Callable[[int, int], int] = compiled_batch_size,
    ):
        self.names, self.count, self.shape = list(names), len(images), images[0].shape
        self.keep = (keep_masks, keep_probabilities)
        self.max_components = options.max_components
        padded = np.stack([pad_to_multiple(image) for image in images])  # uint8 [B, H, W]
        # numpy, put on the device as it is (not through jnp.asarray)
        self.pixels = pad_batch(padded, batch_size(self.count, options.batch_size))

    def fetched(self, found: Detections) -> Detections:
        """The detector's output brought to the host: only what the results need, not the
        labels (8 MiB for 8 images of 512x512), the probabilities and masks only if kept."""
        keep_masks, keep_probabilities = self.keep
        return jax.device_get(
            found._replace(
                probabilities=found.probabilities if keep_probabilities else None,
                labels=None,
                masks=found.masks if keep_masks else None,
            )
        )

    def labeled_on_host(self, probabilities: np.ndarray, threshold, min_area) -> list[Result]:
        """The results of the network's probabilities labeled here (`detections_on_host`):
        ``threshold`` and ``min_area`` numbers, or per image (``[B, 1, 1]`` and ``[B, 1]``)."""
        found = detections_on_host(
            probabilities[: self.count],
            threshold=threshold,
            max_components=self.max_components,
            min_area=min_area,
        )
        return self.results(found)

    def results(self, found: Detections) -> list[Result]:
        """The batch's results (padding dropped), each naming the model that answered."""
        results = batch_results(found, self.count, self.shape, *self.keep)
        for result, name in zip(results, self.names, strict=True):
            result.model = name
        return results


class _Decoded(NamedTuple):
    """An image file read for `Inspector.inspect_files`, with the model that answers it."""

    path: Path
    image: np.ndarray | None
    warning: str | None
    error: str | None
    model: str


def _decode(path_and_model: tuple[Path, str]) -> _Decoded:
    path, model = path_and_model
    try:
        data.check_regular_file(path)
        image, warning = data.load_image(path, convert_to_grayscale=True)
        return _Decoded(path, image, warning, None, model)
    except data.DataError as err:
        return _Decoded(path, None, None, str(err), model)


def _file_groups(
    decoded: Iterator[_Decoded], batch_size: int, tiled, width_of
) -> Iterator[tuple[list[_Decoded], bool]]:
    """Decoded files in groups of one image size and model width, at most ``batch_size``:
    ``(items, in tiles)``. A file that could not be decoded and an image that goes through
    tiles pass alone (an error as soon as it is met)."""
    batch: list = []
    batch_key = None
    for item in decoded:
        if item.error is not None:
            yield [item], False
            continue
        image = item.image
        in_tiles = tiled(image.shape)
        key = (image.shape, width_of(item.model))
        if batch and (len(batch) == batch_size or batch_key != key or in_tiles):
            yield batch, False
            batch = []
        if in_tiles:
            yield [item], True
            continue
        batch_key = key
        batch.append(item)
    if batch:
        yield batch, False


def _put(target: queue.Queue, item, stop: threading.Event) -> None:
    """Put ``item`` unless the consumer has stopped (then it would wait for ever)."""
    while not stop.is_set():
        try:
            target.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
