"""Reading DAGM 2007 folders, normalisation and batching.

A DAGM class folder (``Class6/Train`` or ``Class6/Test``) holds ``NNNN.PNG`` images and
``Label/Labels.txt``, whose first line is the class number and whose rows are
``id <TAB> defective <TAB> image <TAB> 0 <TAB> label`` (label is ``0`` when the image has no
defect). Labels are ``Label/NNNN_label.PNG``, 0/255 ellipses.

Images must be 8-bit grayscale with H and W multiples of 16; RGB, 16-bit or palette PNGs are
rejected (not converted): DAGM is 8-bit grayscale, so anything else means the wrong files.

The plain layout, for a team's own data (`list_plain_samples`): ``images/`` and ``masks/`` with
the same file stems, a missing mask meaning a defect-free image, masks 0 / non-zero; 8-bit
grayscale images of any size, padded at the bottom and right to a multiple of 16 as
`predict.py` pads them (`pad_to_multiple`). `cheapnet_jax.layouts` recognises these and the
annotation tools' layouts.
"""

from __future__ import annotations

import collections
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cheapnet_jax.errors import DataError
from cheapnet_jax.model import SIZE_MULTIPLE, is_valid_size

T = TypeVar("T")
R = TypeVar("R")

DECODE_THREADS = 2
"""Threads that decode PNGs ahead of the device (PIL releases the GIL while decoding)."""

CLASS6_MEAN = 0.348
"""The authors' normalisation mean of pixel/255 (their Class-6 value, used for every class)."""
CLASS6_STD = 0.278
"""The authors' normalisation standard deviation of pixel/255."""
LABELS_FILE = Path("Label") / "Labels.txt"


IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class DagmSample:
    """An image and, when defective, the file its mask comes from: a row of a DAGM
    ``Labels.txt``, or an image of another layout (``any_size``: H and W need not be multiples
    of 16; `cheapnet_jax.layouts`).

    ``mask_of``, when set, makes the mask from ``label_path`` for an image of shape ``[H, W]``
    (annotations drawn, a colour mask's defect colours); else ``label_path`` is an 8-bit
    grayscale mask whose non-zero pixels are defects.
    """

    image_path: Path
    label_path: Path | None
    class_id: int
    any_size: bool = False
    mask_of: Callable[[tuple[int, int]], np.ndarray] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.image_path.name


def list_dagm_samples(folder: str | os.PathLike) -> list[DagmSample]:
    """The samples of a DAGM class folder, in ``Labels.txt`` order; checks that files exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder (expected a DAGM class folder such as Class6/Train)"
        )
    labels_file = folder / LABELS_FILE
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: missing: a DAGM class folder needs Label/Labels.txt")
    lines = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise DataError(f"{labels_file}: the first line must be the class number")
    class_id = int(lines[0][0])
    samples = []
    for line_number, fields in enumerate(lines[1:], start=2):
        if len(fields) != 5 or fields[1] not in ("0", "1"):
            raise DataError(
                f"{labels_file}:{line_number}: expected 'id defective image 0 label', got {fields}"
            )
        image_path = folder / fields[2]
        if not image_path.is_file():
            raise DataError(f"{image_path}: listed in {labels_file}:{line_number} but missing")
        label_path = None
        if fields[1] == "1":
            label_path = folder / "Label" / fields[4]
            if not label_path.is_file():
                raise DataError(f"{label_path}: listed in {labels_file}:{line_number} but missing")
        samples.append(DagmSample(image_path, label_path, class_id))
    if not samples:
        raise DataError(f"{labels_file}: lists no images")
    return samples


def list_plain_samples(folder: str | os.PathLike) -> list[DagmSample]:
    """The samples of a plain ``images/`` + ``masks/`` folder, sorted by file name; a mask is
    the file of ``masks/`` with its image's stem (any image suffix), none for a good image."""
    folder = Path(folder)
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder / 'images'}: no images (PNG, BMP, JPEG or TIFF)")
    masks: dict[str, Path] = {}
    if (folder / "masks").is_dir():
        for mask in sorted((folder / "masks").iterdir()):
            if mask.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if mask.stem in masks:
                raise DataError(f"{mask}: a second mask for {mask.stem} (also {masks[mask.stem]})")
            masks[mask.stem] = mask
    stems = {image.stem for image in images}
    orphans = sorted(set(masks) - stems)
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: a mask without an image in {folder / 'images'}")
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DataError(f"{image}: two images share the stem {image.stem} ({seen[image.stem]})")
        seen[image.stem] = image
    return [DagmSample(image, masks.get(image.stem), 0, any_size=True) for image in images]


def pad_axis_to_multiple(image: np.ndarray, axis: int) -> np.ndarray:
    """Pad one axis of ``[H, W]`` at its end up to a multiple of 16: by reflection, or by
    repeating the edge where the axis is too short to reflect."""
    size = image.shape[axis]
    pad = -size % SIZE_MULTIPLE
    if not pad:
        return image
    widths = [(0, 0)] * image.ndim
    widths[axis] = (0, pad)
    return np.pad(image, widths, mode="reflect" if size > pad else "edge")


def pad_to_multiple(image: np.ndarray) -> np.ndarray:
    """Pad ``[H, W]`` at the bottom and right up to multiples of 16: by reflection, or by
    repeating the edge along an axis too short to reflect."""
    return pad_axis_to_multiple(pad_axis_to_multiple(image, axis=0), axis=1)


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def load_image(
    path: str | os.PathLike, *, convert_to_grayscale: bool = False
) -> tuple[np.ndarray, str | None]:
    """An image as uint8 grayscale ``[H, W]`` and a warning, or DataError naming the file.

    8-bit grayscale is read as is. Other 8-bit modes (colour, palette, alpha) are converted
    with a warning when ``convert_to_grayscale``, else rejected; more than 8 bits is always
    rejected (how to scale it down is the user's call).
    """
    return decode_image(path, str(path), convert_to_grayscale=convert_to_grayscale)


def decode_image(
    source: str | os.PathLike | BinaryIO,
    name: str,
    *,
    convert_to_grayscale: bool = False,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, str | None]:
    """`load_image` of a path or a binary stream (an uploaded body), errors naming ``name``.

    ``max_pixels``: refuse larger images (ImageTooLargeError) from the header, before any pixel is
    decoded, whatever Pillow's own limit.
    """
    try:
        with Image.open(source) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {image.width}x{image.height} is {image.width * image.height:,} "
                    f"pixels, more than the {max_pixels:,} allowed"
                )
            mode = image.mode
            warning = None
            if mode != "L":
                if not convert_to_grayscale or mode in HIGH_BIT_DEPTH_MODES:
                    raise ImageModeError(
                        f"{name}: image mode {mode!r} ({_describe_mode(mode)}); expected 8-bit "
                        "grayscale ('L'): convert it first, e.g. PIL's Image.convert('L')"
                    )
                warning = f"converted from mode {mode!r} to 8-bit grayscale"
                image = image.convert("L")
            pixels = np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from err
    except Image.DecompressionBombError as err:  # not an OSError: Pillow's own limit
        raise ImageTooLargeError(
            f"{name}: larger than Pillow allows ({err}); if the file is trusted, raise the limit "
            "(predict.py --max-image-pixels)"
        ) from err
    return pixels, warning


class ImageTooLargeError(DataError):
    """An image of more pixels than allowed (`decode_image`'s ``max_pixels``, Pillow's limit)."""


class ImageModeError(DataError):
    """A decodable image in a pixel format that is not read (16-bit, or colour when not
    converted)."""


def allow_image_pixels(count: int) -> None:
    """Read images of up to ``count`` pixels without Pillow's decompression-bomb warning or
    error (by default Pillow warns above 89 million pixels and refuses twice that). Global:
    set once, before reading starts."""
    Image.MAX_IMAGE_PIXELS = count // 2  # Pillow refuses above twice its limit
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_regular_file(path: str | os.PathLike) -> None:
    """DataError unless ``path`` is a regular file (or a link to one): a named pipe, socket or
    device would block or never end when read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a folder, pipe, socket or device)")


def _describe_mode(mode: str) -> str:
    return {
        "RGB": "colour",
        "RGBA": "colour with alpha",
        "I;16": "16-bit",
        "I;16B": "16-bit",
        "I": "32-bit integer",
        "P": "palette",
        "1": "1-bit",
        "LA": "grayscale with alpha",
    }.get(mode, "unsupported")


def check_image_size(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    """DataError unless H and W are positive multiples of 16."""
    height, width = shape[:2]
    if not is_valid_size(height, width):
        raise DataError(
            f"{path}: size {height}x{width} is not a multiple of {SIZE_MULTIPLE} "
            "(CheapNet has four stride-2 stages): pad or crop it"
        )


class ConvertedImageWarning(UserWarning):
    """A colour or palette image was converted to grayscale to be read."""


def read_sample(sample: DagmSample) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [H, W], mask bool [H, W])``; a defect-free sample has an all-false mask.
    H and W are multiples of 16 unless the sample is ``any_size`` (the caller pads).

    A colour or palette image is converted to grayscale with a `ConvertedImageWarning`, as
    predict.py and the service convert it (one rule for every tool); 16-bit is refused."""
    image, converted = load_image(sample.image_path, convert_to_grayscale=True)
    if converted:
        warnings.warn(f"{sample.image_path}: {converted}", ConvertedImageWarning, stacklevel=2)
    if not sample.any_size:
        check_image_size(sample.image_path, image.shape)
    if sample.label_path is None:
        return image, np.zeros(image.shape, bool)
    if sample.mask_of is not None:
        return image, sample.mask_of(image.shape)
    label = read_mask(sample.label_path)
    if label.shape != image.shape:
        raise DataError(
            f"{sample.label_path}: label size {label.shape[0]}x{label.shape[1]} differs from "
            f"its image {sample.image_path.name} ({image.shape[0]}x{image.shape[1]})"
        )
    return image, label


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as bool ``[H, W]``: any non-zero pixel is a defect, as the authors read
    their 1-bit labels. 0/255 and 0/1 grayscale alike; a palette mask by its indices (index 0
    good); a colour mask by its colours (black good). 16-bit or wider: DataError."""
    try:
        with Image.open(path) as image:
            if image.mode in HIGH_BIT_DEPTH_MODES:
                raise ImageModeError(
                    f"{path}: mask mode {image.mode!r} ({_describe_mode(image.mode)}); expected "
                    "8 bits: save it as 8-bit grayscale (0 good, non-zero defect)"
                )
            pixels = np.asarray(image)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode mask ({type(err).__name__}: {err})") from err
    return pixels.any(-1) if pixels.ndim == 3 else pixels != 0


def normalize(images: np.ndarray, mean: float = CLASS6_MEAN, std: float = CLASS6_STD) -> np.ndarray:
    """uint8 ``[..., H, W]`` -> float32 ``[..., H, W, 1]`` as ``(pixel / 255 - mean) / std``."""
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - np.float32(mean)) / np.float32(std))[..., None]


def threaded_map(
    function: Callable[[T], R], items: Iterable[T], workers: int = DECODE_THREADS, ahead: int = 0
) -> Iterator[R]:
    """``function(item)`` for every item, in order, computed by ``workers`` threads.

    At most ``ahead`` results (default ``2 * workers``) are computed before the consumer asks
    for them, so memory stays bounded however long ``items`` is (`Executor.map` would submit
    everything at once). An exception raised by ``function`` is raised here, in order.
    """
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque[Future[R]] = collections.deque()
        for item in items:
            if len(pending) >= ahead:
                yield pending.popleft().result()
            pending.append(pool.submit(function, item))
        while pending:
            yield pending.popleft().result()


def _read_chunk(samples: list[DagmSample]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [read_sample(sample) for sample in samples]


def iterate_batches(
    samples: list[DagmSample], batch_size: int, workers: int = DECODE_THREADS
) -> Iterator[tuple[list[DagmSample], np.ndarray, np.ndarray]]:
    """Yield ``(samples, images uint8 [b, H, W], masks bool [b, H, W])``, b <= batch_size.

    ``workers`` threads decode up to ``workers`` batches ahead while the caller uses the current
    one, so memory holds at most ``workers + 1`` batches. A batch holds images of one size:
    where the size changes, the batch is cut there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    decoded = threaded_map(_read_chunk, chunks, workers, ahead=workers)
    for chunk, pairs in zip(chunks, decoded, strict=True):
        start = 0
        for end in range(1, len(pairs) + 1):  # runs of one size
            if end == len(pairs) or pairs[end][0].shape != pairs[start][0].shape:
                run = pairs[start:end]
                yield chunk[start:end], np.stack([p[0] for p in run]), np.stack([p[1] for p in run])
                start = end


def paper_split(
    root: str | os.PathLike, classes: list[int], seed: int = 0, train_fraction: float = 0.8
) -> dict[str, list[DagmSample]]:
    """The paper's protocol: each class's defective images (its Train and Test folders), split
    ``train_fraction`` / rest into train / validation by a fixed seed, per class."""
    root = Path(root)
    splits: dict[str, list[DagmSample]] = {"train": [], "validation": []}
    for class_id in classes:
        folders = [root / f"Class{class_id}" / part for part in ("Train", "Test")]
        present = [folder for folder in folders if folder.is_dir()]
        if not present:
            raise DataError(
                f"{root / f'Class{class_id}'}: missing: put the DAGM 2007 download there "
                "(Class1..Class10, each with Train/ and Test/)"
            )
        defective = [s for f in present for s in list_dagm_samples(f) if s.label_path is not None]
        if not defective:
            raise DataError(f"{root / f'Class{class_id}'}: no defective images listed")
        defective.sort(key=lambda sample: str(sample.image_path))
        order = np.random.default_rng([seed, class_id]).permutation(len(defective))
        cut = round(train_fraction * len(defective))
        splits["train"] += [defective[i] for i in order[:cut]]
        splits["validation"] += [defective[i] for i in order[cut:]]
    return splits


def dagm_split(
    root: str | os.PathLike, classes: list[int], seed: int = 0, train_fraction: float = 0.8
) -> dict[str, list[DagmSample]]:
    """DAGM's own protocol: each class's ``Train`` folder, defect-free images included, split
    ``train_fraction`` / rest into train / validation (for validation and calibration) by a
    fixed seed, per class; ``Test`` is left for evaluation."""
    splits: dict[str, list[DagmSample]] = {"train": [], "validation": []}
    for class_id in classes:
        folder = Path(root) / f"Class{class_id}" / "Train"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing: the dagm protocol trains on DAGM's Train folders")
        samples = sorted(list_dagm_samples(folder), key=lambda sample: str(sample.image_path))
        order = np.random.default_rng([seed, class_id]).permutation(len(samples))
        cut = min(max(round(train_fraction * len(samples)), 1), len(samples) - 1)
        splits["train"] += [samples[i] for i in order[:cut]]
        splits["validation"] += [samples[i] for i in order[cut:]]
    return splits


def random_split(
    samples: list[DagmSample], seed: int = 0, train_fraction: float = 0.8, name: object = ""
) -> dict[str, list[DagmSample]]:
    """Samples, defective and defect-free alike, split ``train_fraction`` / rest into train /
    validation by a fixed seed (at least one image in each)."""
    if len(samples) < 2:
        raise DataError(f"{name}: training needs at least 2 images, found {len(samples)}")
    order = np.random.default_rng([seed, 0]).permutation(len(samples))
    cut = min(max(round(train_fraction * len(samples)), 1), len(samples) - 1)
    return {
        "train": [samples[i] for i in order[:cut]],
        "validation": [samples[i] for i in order[cut:]],
    }


def _read_padded(sample: DagmSample) -> tuple[np.ndarray, np.ndarray]:
    """`read_sample`, with an any-size image and its mask padded alike (reflection) to a
    multiple of 16, so that a defect reflected into the padding is labeled a defect."""
    image, mask = read_sample(sample)
    if sample.any_size:
        return pad_to_multiple(image), pad_to_multiple(mask)
    return image, mask


def load_samples(
    samples: list[DagmSample], workers: int = DECODE_THREADS, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All images and masks of ``samples`` in memory: uint8 [N, H, W] and bool [N, H, W]
    (any-size samples padded to a multiple of 16, see `_read_padded`)."""
    decoded = threaded_map(_read_padded, samples, workers, ahead=4 * workers)
    pairs = list(tqdm(decoded, total=len(samples), desc="decode", unit="img", disable=not progress))
    shapes = {image.shape for image, _ in pairs}
    if len(shapes) != 1:
        raise DataError(f"images of several sizes {sorted(shapes)}: training needs one size")
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def normalization_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of pixel/255 over uint8 images (float64 accumulation)."""
    scaled = images.astype(np.float64) / 255.0
    return float(scaled.mean()), float(scaled.std())


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def balanced_order(
    defective: np.ndarray, seed: int, epoch: int, batch_size: int, steps: int, fraction: float
) -> np.ndarray:
    """An epoch's ``steps`` batches of examples with ``round(fraction * batch_size)`` defective
    ones each (at least one), the rest good: each kind shuffled by (seed, epoch) and gone
    through in turn, starting over when used up. A pure function of its arguments; the plain
    `epoch_order` when either kind is missing."""
    defective = np.asarray(defective, bool)
    bad, good = np.flatnonzero(defective), np.flatnonzero(~defective)
    if not len(bad) or not len(good):
        return epoch_order(len(defective), seed, epoch)
    rng = np.random.default_rng([seed, epoch, 1])
    per_batch = min(max(round(fraction * batch_size), 1), batch_size - 1)
    rest = batch_size - per_batch
    bad_stream = np.resize(rng.permutation(bad), steps * per_batch).reshape(steps, per_batch)
    good_stream = np.resize(rng.permutation(good), steps * rest).reshape(steps, rest)
    batches = np.concatenate([bad_stream, good_stream], axis=1)
    return np.concatenate([rng.permutation(batch) for batch in batches])


def host_share(
    indices: np.ndarray, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """This process's contiguous share of a global batch's example indices.

    One process (the default without `jax.distributed`) gets them all.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if len(indices) % process_count:
        raise ValueError(f"a batch of {len(indices)} does not split over {process_count} hosts")
    per_host = len(indices) // process_count
    return indices[process_index * per_host : (process_index + 1) * per_host]


def shard_batch(batch: np.ndarray, devices: int) -> np.ndarray:
    """``[global_batch, ...]`` -> ``[devices, global_batch / devices, ...]`` for pmap."""
    if batch.shape[0] % devices:
        raise ValueError(f"a batch of {batch.shape[0]} does not split over {devices} devices")
    return batch.reshape(devices, batch.shape[0] // devices, *batch.shape[1:])
