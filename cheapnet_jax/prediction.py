"""Defects of new images: `predict.py`'s streaming loop, records, CSV and overlays.

Images of any size are padded to a multiple of 16 by reflection and the probabilities are
cropped back before thresholding and labeling, so defects never come from the padding. Images of
more than ``tile_above`` pixels (or all, with ``tile``) go through `cheapnet_jax.tiling` one at a
time: the same defects in memory set by the tile size; their overlays are written only up to
``tile_above`` pixels (an overlay is image-sized).
Colour and palette images are converted to grayscale with a warning in their record; 16-bit
images and unreadable files are reported (``error``) and skipped. Results go to
``defects.jsonl`` one line per image as soon as its batch is done, so a killed run keeps what
it finished and ``resume`` skips those files; ``defects.json`` and ``defects.csv`` are written
from it at the end.
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cheapnet_jax import data
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
from cheapnet_jax.files import exclusive_lock, write_atomic
from cheapnet_jax.tiling import (
    DEFAULT_TILE,
    TiledDetections,
    detect_tiled,
    make_tile_detector,
)

RECORDS_FILE = "defects.jsonl"
OVERLAY_WRITERS = 2
"""Threads that encode and write a batch's overlays side by side."""


@dataclass(frozen=True)
class PredictOptions:
    """`predict.py`'s settings."""

    threshold: float = 0.5
    min_area: int = 0
    batch_size: int = 8
    decode_threads: int = data.DECODE_THREADS
    max_components: int = 256
    overlays: bool = True
    resume: bool = False
    progress: bool = True
    dtype: str = "float32"
    tile: int | None = None  # tile every image with tiles of this size
    tile_above: int = 2048 * 2048  # tile images of more pixels (with DEFAULT_TILE) ...
    # the network alone, then labels on the host while the next batch's network runs
    # (`detection.labels_on_host`); None: for small widths on the CPU
    labels_on_host: bool | None = None


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, in order, no repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item))
            if not matches:
                raise FileNotFoundError(errno.ENOENT, "no such file, folder or matching glob", item)
            found += [p for p in matches if p.suffix.lower() in data.IMAGE_SUFFIXES]
    return list(dict.fromkeys(found))


def read_image(path: Path) -> tuple[np.ndarray, str | None]:
    """uint8 grayscale ``[H, W]`` and a warning (colour converted); DataError when unusable."""
    return data.load_image(path, convert_to_grayscale=True)


def image_record(path: Path, found, index: int, warning: str | None) -> dict:
    """The JSON record of one image from a batch's detections (numpy)."""
    height, width = found.masks[index].shape
    defects = defect_list(found, index)
    return _record(path, (height, width), defects, int(found.overflow[index]), warning)


def defect_list(found, index: int) -> list[dict]:
    """Image ``index``'s defects of a batch's detections (numpy), as every tool reports them:
    ``{"box": [x1, y1, x2, y2], "area", "score"}`` in raster order."""
    valid = found.valid[index]
    rows = zip(found.stats[index][valid], found.scores[index][valid], strict=True)
    return [_defect(row[:4], row[4], score) for row, score in rows]


def tiled_defect_list(found: TiledDetections) -> list[dict]:
    """`defect_list` of an image detected in tiles."""
    return [_defect((d.x1, d.y1, d.x2, d.y2), d.area, d.score) for d in found.defects]


def tiled_image_record(path: Path, shape, found: TiledDetections, warning: str | None) -> dict:
    """The JSON record of one image detected in tiles: `image_record`'s fields, plus ``tiles``
    and, where a tile had more components than it measures, ``parts_left_out``."""
    record = _record(path, shape, tiled_defect_list(found), found.overflow, warning)
    record["tiles"] = found.tiles
    if found.parts_left_out:
        record["parts_left_out"] = found.parts_left_out
    return record


def _defect(box, area, score) -> dict:
    return {"box": [int(v) for v in box], "area": int(area), "score": round(float(score), 6)}


def _record(path: Path, shape, defects: list[dict], overflow: int, warning: str | None) -> dict:
    height, width = shape
    record = {
        "file": str(path),
        "key": resume_key(path),
        "verdict": "NG" if defects else "OK",
        "width": width,
        "height": height,
        "defects": defects,
    }
    if overflow:
        record["components_left_out"] = overflow
    if warning:
        record["warning"] = warning
    return record


def overlay_name(path: Path) -> str:
    """``<stem>.png``, with a digest of the folder so that same-named inputs never collide."""
    folder = hashlib.sha1(str(path.parent.absolute()).encode()).hexdigest()[:8]
    return f"{path.stem}-{folder}.png"


def render_overlay(image: np.ndarray, mask: np.ndarray, defects: list[dict]) -> bytes:
    """PNG bytes: the image with the predicted mask tinted red and each defect's box drawn
    with its area."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([255, 0, 0], np.float32)
    overlay = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    for defect in defects:
        x1, y1, x2, y2 = defect["box"]
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 0), width=2)
        draw.text((x1, max(0, y1 - 12)), f"{defect['area']} px", fill=(255, 255, 0))
    encoded = io.BytesIO()
    # zlib level 1: on a 512x512 DAGM overlay 22 ms and 357 KiB against 98 ms and 446 KiB at
    # Pillow's default 6 (the texture barely compresses; the same pixels either way).
    overlay.save(encoded, format="PNG", compress_level=1)
    return encoded.getvalue()


def write_overlay(path: Path, image: np.ndarray, mask: np.ndarray, record: Mapping) -> None:
    """`render_overlay` of a record's defects, written atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_overlay(image, mask, record["defects"]))


def _decode(path: Path):
    try:
        data.check_regular_file(path)
        image, warning = read_image(path)
        return path, image, warning, None
    except data.DataError as err:
        return path, None, None, str(err)


def _batches(decoded: Iterator, batch_size: int, tiled) -> Iterator[tuple[list, list, bool]]:
    """Group decoded images into batches of one size: ``(batch, errors, in tiles)``. Errors
    and the images that ``tiled(image)`` sends through tiles pass alone."""
    batch: list = []
    for path, image, warning, error in decoded:
        if error is not None:
            yield [], [(path, error)], False
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape or tiled(image)):
            yield batch, [], False
            batch = []
        if tiled(image):
            yield [(path, image, warning)], [], True
            continue
        batch.append((path, image, warning))
    if batch:
        yield batch, [], False


def resume_key(path: Path) -> str:
    """The identity of an input file for resume: its absolute path with links resolved, so
    that ``imgs/a.png``, ``./imgs//a.png`` and ``/abs/imgs/a.png`` are one file."""
    return os.fsdecode(os.path.realpath(path))


def read_records(out_dir: Path) -> list[dict]:
    """The complete records of ``defects.jsonl`` (a line cut by a crash is skipped)."""
    records_file = out_dir / RECORDS_FILE
    if not records_file.is_file():
        return []
    records = []
    text = records_file.read_text(encoding="utf-8", errors="surrogateescape")
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def finished_files(out_dir: Path) -> set[str]:
    """Resume keys (`resume_key`) of the files already predicted in ``defects.jsonl``; failed
    ones are tried again.

    The file is rewritten, atomically, with its complete records only: a line cut by a crash
    is dropped (that image is predicted again) and new records start on a line of their own.
    """
    records = read_records(out_dir)
    if not (out_dir / RECORDS_FILE).is_file():
        return set()
    write_atomic(out_dir / RECORDS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    return {r.get("key", r["file"]) for r in records if "error" not in r}


def predict_files(
    loaded: LoadedModel,
    paths: list[Path],
    out_dir: str | os.PathLike,
    normalization: Normalization,
    options: PredictOptions = PredictOptions(),
) -> dict:
    """Run the detector over ``paths``; returns ``{"images", "failed", "skipped"}`` counts.

    ``out_dir`` is locked while the run uses it: a second run on it stops with
    FolderInUseError instead of interleaving its records with this one's.
    """
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir, "predict.py run"):
        return _predict_files(loaded, paths, out_dir, normalization, options)


def _predict_files(loaded, paths, out_dir, normalization, options) -> dict:
    done = finished_files(out_dir) if options.resume else set()
    if not options.resume:
        (out_dir / RECORDS_FILE).unlink(missing_ok=True)
    todo = [p for p in paths if resume_key(p) not in done]
    counts = {"images": 0, "failed": 0, "skipped": len(paths) - len(todo)}
    progress = tqdm(total=len(todo), desc="predict", unit="img", disable=not options.progress)
    # Decoding threads stay a bounded distance ahead of the device's work.
    decoded = data.threaded_map(_decode, todo, options.decode_threads, ahead=2 * options.batch_size)
    settings = dict(
        threshold=options.threshold,
        dtype=options.dtype,
        normalization=(normalization.mean, normalization.std),
    )
    detector = make_detector(
        loaded.model,
        max_components=options.max_components,
        min_area=options.min_area,
        **settings,
    )
    tile_detector = make_tile_detector(loaded.model, **settings)
    on_cpu = jax.default_backend() == "cpu"
    network = None
    if labels_on_host(loaded.model.features, on_cpu, options.labels_on_host):
        network = make_network(
            loaded.model, dtype=options.dtype, normalization=settings["normalization"]
        )

    def tiled(image: np.ndarray) -> bool:
        return options.tile is not None or image.size > options.tile_above

    records_file = out_dir / RECORDS_FILE
    with (
        records_file.open("a", encoding="utf-8", errors="surrogateescape") as records,
        # One batch's detections finished and its records written here while the next one's
        # device part runs; the main thread writes only once that is done (`settle`), so the
        # records keep their order, and a failure there surfaces at the next batch.
        ThreadPoolExecutor(1, thread_name_prefix="predict-host") as host,
        ThreadPoolExecutor(OVERLAY_WRITERS, thread_name_prefix="predict-overlay") as overlays,
    ):
        pending: list[Future] = []

        def settle() -> None:
            while pending:
                pending.pop().result()

        for batch, errors, in_tiles in _batches(decoded, options.batch_size, tiled):
            if errors or in_tiles:
                settle()
                for path, error in errors:
                    print(f"error: {error}", file=sys.stderr)
                    record = {"file": str(path), "key": resume_key(path), "error": error}
                    records.write(json.dumps(record) + "\n")
                    counts["failed"] += 1
                if batch and in_tiles:
                    _predict_tiled(loaded, tile_detector, batch[0], out_dir, options, records)
                records.flush()
            if batch and not in_tiles:
                finish = _detect_batch(loaded, detector, network, batch, options)
                settle()
                pending.append(
                    host.submit(_write_batch, finish, batch, out_dir, options, records, overlays)
                )
            counts["images"] += len(batch)
            progress.update(len(batch) + len(errors))
        settle()
    progress.close()
    write_summaries(out_dir)
    return counts


def _detect_batch(loaded, detector, network, batch, options) -> Callable[[], Detections]:
    """A batch's device part; returns its host part, a function giving its detections (numpy):
    the network's probabilities labeled by `detections_on_host` where ``network`` is given,
    else the detector's own results."""
    height, width = batch[0][1].shape
    padded = np.stack([pad_to_multiple(image) for _, image, _ in batch])  # uint8 [B, H, W]
    x = jax.device_put(pad_batch(padded, compiled_batch_size(len(batch), options.batch_size)))
    if network is not None:
        probabilities = np.asarray(network(loaded.variables, x, crop=(height, width)))
        return lambda: detections_on_host(
            probabilities[: len(batch)],
            threshold=options.threshold,
            max_components=options.max_components,
            min_area=options.min_area,
        )
    found = detector(loaded.variables, x, crop=(height, width))
    # The records need the boxes, scores and masks: the probabilities and labels stay behind.
    found = jax.device_get(found._replace(probabilities=None, labels=None))
    return lambda: found


def _write_batch(finish, batch, out_dir, options, records, overlay_writers) -> None:
    found = finish()
    batch_records = [
        image_record(path, found, index, warning) for index, (path, _, warning) in enumerate(batch)
    ]
    if options.overlays:
        names = [overlay_name(path) for path, _, _ in batch]
        # Pillow encodes PNG without the interpreter lock: the batch's overlays side by side.
        written = overlay_writers.map(
            write_overlay,
            [out_dir / "overlays" / name for name in names],
            [image for _, image, _ in batch],
            found.masks[: len(batch)],
            batch_records,
        )
        list(written)  # all written (or the first error raised) before the records
        for record, name in zip(batch_records, names, strict=True):
            record["overlay"] = str(Path("overlays") / name)
    for record in batch_records:
        records.write(json.dumps(record) + "\n")
    records.flush()


def _predict_tiled(loaded, tile_detector, item, out_dir, options, records) -> None:
    path, image, warning = item
    overlay = options.overlays and image.size <= options.tile_above
    found = detect_tiled(
        tile_detector,
        loaded.variables,
        image,
        tile=options.tile or DEFAULT_TILE,
        max_components=options.max_components,
        min_area=options.min_area,
        keep_maps=overlay,
    )
    record = tiled_image_record(path, image.shape, found, warning)
    if overlay:
        name = overlay_name(path)
        write_overlay(out_dir / "overlays" / name, image, found.mask, record)
        record["overlay"] = str(Path("overlays") / name)
    elif options.overlays:
        record["overlay_skipped"] = f"over {options.tile_above} pixels (--tile-above)"
    records.write(json.dumps(record) + "\n")


def write_summaries(out_dir: Path) -> None:
    """``defects.json`` (all records) and ``defects.csv`` (a row per defect, and per image
    without defects or with an error) from ``defects.jsonl``."""
    records = {}
    for record in read_records(out_dir):
        # a re-run's record replaces an older one
        records[record.get("key", record["file"])] = record
    write_atomic(out_dir / "defects.json", json.dumps(list(records.values()), indent=2) + "\n")
    columns = ["file", "verdict", "x1", "y1", "x2", "y2", "area", "score", "error"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    for record in records.values():
        base = {"file": record["file"], "verdict": record.get("verdict", "ERROR")}
        if "error" in record:
            writer.writerow({**base, "error": record["error"]})
        elif not record["defects"]:
            writer.writerow(base)
        for defect in record.get("defects", []):
            x1, y1, x2, y2 = defect["box"]
            writer.writerow(
                {
                    **base,
                    "x1": x1,
                    "y1": y1,
                    "x2": x2,
                    "y2": y2,
                    "area": defect["area"],
                    "score": defect["score"],
                }
            )
    write_atomic(out_dir / "defects.csv", table.getvalue())
