"""The inspection service's device side: a checkpoint's detectors, one call per batch.

An `Inspector` answers a batch of same-sized uint8 images with `predict.py`'s very program
(`make_detector` with the same padding, batch padding and crop), so the service's answer for an
image is predict.py's. Images above ``tile_above`` pixels go through the exact tiler
(`detect_tiled`), one at a time. Detectors are compiled per ``(threshold, min_area)`` and kept
(the defaults always, at most `DETECTOR_CACHE` others), and a copy of the weights lives on each
local device, so that one worker thread per device can run batches side by side (on
accelerators; on the CPU, programs take turns: `CPU_PROGRAMS`).

A batch is inspected in two parts (`Inspector.start_batch`): the device's, then the host's. On
the CPU with OpenCV, where the detector would label in a host callback anyway, the device runs
the network alone and the host labels and measures (`detections_on_host`: the detector's very
arrays, tested), so that a service labels one batch on one core while the network of the next
runs: CheapNet-S served 1.2x the answers per second of the one program (BENCHMARKS.md). Only
for small widths by default (`detection.LABELS_ON_HOST_UP_TO`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from cheapnet_jax.calibration import Setting
from cheapnet_jax.checkpoints import LoadedModel, Normalization
from cheapnet_jax.data import pad_to_multiple
from cheapnet_jax.detection import (
    Detections,
    detections_on_host,
    labels_on_host,
    make_detector,
    make_network,
)
from cheapnet_jax.evaluation import compiled_batch_size, pad_batch
from cheapnet_jax.model import VARIANTS
from cheapnet_jax.prediction import defect_list, tiled_defect_list
from cheapnet_jax.tiling import DEFAULT_TILE, detect_tiled, make_tile_detector

CPU_PROGRAMS = threading.Lock()
"""Held by every inspector of the process while a detector program runs on the CPU. There the
labeler runs in a host callback, and two programs with host callbacks executing at once on
XLA:CPU can deadlock (jax 0.10; 2 CPU devices, or 2 threads on one, such as a request served
during the warm-up: both callbacks wait for the copy of their inputs jax makes before calling
them). The deadlock is the process's, not one inspector's, so the lock is too. CPU devices
share the same cores anyway; accelerators (union-find labeler, no callback) run side by side."""

DETECTOR_CACHE = 8
"""Compiled detectors kept for request settings other than the defaults (least recently used
dropped first), so that many distinct thresholds cannot fill the memory with programs."""


@dataclass(frozen=True)
class InspectorOptions:
    """What every request shares (the service's flags)."""

    max_batch: int = 8
    max_components: int = 256
    dtype: str = "float32"
    tile_above: int = 2048 * 2048  # images of more pixels go through tiles of DEFAULT_TILE
    # On the CPU with OpenCV, run the network alone and label on the host in `start_batch`'s
    # second part (the same arrays); False: the whole detector as one program (predict.py's);
    # None: for widths up to `detection.LABELS_ON_HOST_UP_TO`.
    labels_on_host: bool | None = None


@dataclass
class Inspection:
    """One image's answer: defects as predict.py records them, and the mask for an overlay."""

    defects: list[dict]
    components_left_out: int
    mask: np.ndarray | None
    tiles: int | None = None


def _inspections(found: Detections, count: int, keep_masks: bool) -> list[Inspection]:
    """The first ``count`` images' inspections of a batch's detections (numpy)."""
    return [
        Inspection(
            defects=defect_list(found, index),
            components_left_out=int(found.overflow[index]),
            mask=found.masks[index] if keep_masks else None,
        )
        for index in range(count)
    ]


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


class Inspector:
    """A checkpoint's detectors on every local device; thread-safe, one thread per device
    (on the CPU, one program at a time in the whole process: `CPU_PROGRAMS`)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        loaded: LoadedModel,
        normalization: Normalization,
        defaults: Mapping[str, Setting],
        options: InspectorOptions = InspectorOptions(),
        devices: list | None = None,
    ):
        self.checkpoint = Path(checkpoint)
        self.loaded = loaded
        self.normalization = normalization
        self.defaults = dict(defaults)
        self.options = options
        self.devices = devices or jax.local_devices()
        self.digest = weights_digest(loaded.variables)
        self._variables = [jax.device_put(loaded.variables, d) for d in self.devices]
        self._lock = threading.Lock()
        on_cpu = any(device.platform == "cpu" for device in self.devices)
        self._executing = CPU_PROGRAMS if on_cpu else contextlib.nullcontext()
        # Where the detector would label on the host anyway (XLA:CPU with OpenCV, its
        # `method="auto"`), the inspector runs the network alone and labels in `start_batch`'s
        # second part: the same arrays, and a service's next batch need not wait for it.
        self.labels_on_host = labels_on_host(loaded.model.features, on_cpu, options.labels_on_host)
        self._network = make_network(
            loaded.model,
            dtype=options.dtype,
            normalization=(normalization.mean, normalization.std),
        )
        self._detectors: collections.OrderedDict = collections.OrderedDict()
        self._tile_detectors: dict = {}

    @property
    def default_threshold(self) -> float:
        return float(self.defaults["threshold"].value)

    @property
    def default_min_area(self) -> int:
        return int(self.defaults["min_area"].value)

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
                normalization=(self.normalization.mean, self.normalization.std),
            )
            self._detectors[key] = made
            default = (self.default_threshold, self.default_min_area)
            others = [k for k in self._detectors if k != default]
            if len(others) > DETECTOR_CACHE:
                del self._detectors[others[0]]
            return made

    def tile_detector(self, threshold: float):
        with self._lock:
            if threshold not in self._tile_detectors:
                self._tile_detectors[threshold] = make_tile_detector(
                    self.loaded.model,
                    threshold=threshold,
                    dtype=self.options.dtype,
                    normalization=(self.normalization.mean, self.normalization.std),
                )
            return self._tile_detectors[threshold]

    def tiled(self, shape: tuple[int, int]) -> bool:
        """Whether an image of this shape goes through the tiler."""
        return shape[0] * shape[1] > self.options.tile_above

    def inspect_batch(
        self,
        device: int,
        images: list[np.ndarray],
        threshold: float,
        min_area: int,
        keep_masks: bool = False,
    ) -> list[Inspection]:
        """Defects of uint8 ``[H, W]`` images of one shape, on local device ``device``: as
        predict.py computes them (padded to a multiple of 16, the batch padded to
        `compiled_batch_size`, probabilities cropped back)."""
        return self.start_batch(device, images, threshold, min_area, keep_masks)()

    def start_batch(
        self,
        device: int,
        images: list[np.ndarray],
        threshold: float,
        min_area: int,
        keep_masks: bool = False,
    ) -> Callable[[], list[Inspection]]:
        """`inspect_batch` in two parts: the device's, done here, and the host's, returned as a
        function to call (in any thread) for the inspections. Where `labels_on_host` (small
        models on the CPU, with OpenCV) the device runs the network alone and the returned
        function labels and measures the masks (`detections_on_host`: the detector's very
        arrays), so that a service can label one batch while the next one's network runs;
        elsewhere the device runs the whole detector and the function only lists the
        defects."""
        height, width = images[0].shape
        padded = np.stack([pad_to_multiple(image) for image in images])
        x = pad_batch(padded, compiled_batch_size(len(images), self.options.max_batch))
        x = jax.device_put(x, self.devices[device])  # numpy straight over (not jnp.asarray)
        if self.labels_on_host:
            with self._executing:
                probabilities = self._network(self._variables[device], x, crop=(height, width))
                probabilities = np.asarray(jax.device_get(probabilities))[: len(images)]
            options = self.options
            return lambda: _inspections(
                detections_on_host(
                    probabilities,
                    threshold=threshold,
                    max_components=options.max_components,
                    min_area=min_area,
                ),
                len(images),
                keep_masks,
            )
        detector = self.detector(threshold, min_area)
        with self._executing:
            found = detector(self._variables[device], x, crop=(height, width))
            # Only what the answers need comes back to the host: not the probabilities and
            # labels (8 MiB each for 8 images of 512x512), the masks only for overlays.
            masks = found.masks if keep_masks else None
            found = jax.device_get(found._replace(probabilities=None, labels=None, masks=masks))
        return lambda: _inspections(found, len(images), keep_masks)

    def inspect_tiled(
        self,
        device: int,
        image: np.ndarray,
        threshold: float,
        min_area: int,
        keep_masks: bool = False,
    ) -> Inspection:
        """Defects of one large image in exact tiles (`detect_tiled`), on local device
        ``device``."""
        with self._executing, jax.default_device(self.devices[device]):
            found = detect_tiled(
                self.tile_detector(threshold),
                self._variables[device],
                image,
                tile=DEFAULT_TILE,
                max_components=self.options.max_components,
                min_area=min_area,
                keep_maps=keep_masks,
            )
        return Inspection(
            defects=tiled_defect_list(found),
            components_left_out=found.overflow,
            mask=found.mask if keep_masks else None,
            tiles=found.tiles,
        )

    def warm(self, shape: tuple[int, int]) -> None:
        """Compile the default settings' programs for images of ``shape`` on every device, at
        every batch size a request can run as (powers of two up to ``max_batch``)."""
        if self.tiled(shape):
            blank = np.zeros(shape, np.uint8)
            for device in range(len(self.devices)):
                self.inspect_tiled(device, blank, self.default_threshold, self.default_min_area)
            return
        largest = self.options.max_batch
        sizes = sorted({compiled_batch_size(n, largest) for n in range(1, largest + 1)})
        for device in range(len(self.devices)):
            for size in sizes:
                blank = [np.zeros(shape, np.uint8)] * size
                self.inspect_batch(device, blank, self.default_threshold, self.default_min_area)
