"""Defects of new images: `predict.py`'s records, CSV and overlays, written as an `Inspector`
streams its results (`Inspector.inspect_files`: any size, tiles above a size, colour
converted with a warning, unreadable and 16-bit files reported with their ``error``).

Results go to ``defects.jsonl`` one line per image as soon as its batch is done, so a killed
run keeps what it finished and ``resume`` skips those files; ``defects.json`` and
``defects.csv`` are written from it at the end. Overlays are written up to the inspector's
``tile_above`` pixels (an overlay is image-sized).
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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cheapnet_jax import data
from cheapnet_jax.files import exclusive_lock, write_atomic
from cheapnet_jax.inspection import Defect, Inspector, Result

RECORDS_FILE = "defects.jsonl"
OVERLAY_WRITERS = 2
"""Threads that encode and write overlays side by side."""
RECORDS_WAITING = 4 * OVERLAY_WRITERS
"""Records held while their overlays are written (written in order once all are)."""


@dataclass(frozen=True)
class PredictOptions:
    """What `predict.py` writes and how (the inspection's own settings are the
    `Inspector`'s)."""

    decode_threads: int = data.DECODE_THREADS
    overlays: bool = True
    resume: bool = False
    progress: bool = True


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


def image_record(path: Path, result: Result) -> dict:
    """The JSON record of one image's result."""
    if result.error is not None:
        return {"file": str(path), "key": resume_key(path), "error": result.error}
    record = {
        "file": str(path),
        "key": resume_key(path),
        "verdict": result.verdict,
        "width": result.width,
        "height": result.height,
        "defects": [defect.as_dict() for defect in result.defects],
    }
    if result.components_left_out:
        record["components_left_out"] = result.components_left_out
    if result.warning:
        record["warning"] = result.warning
    if result.tiles is not None:
        record["tiles"] = result.tiles
        if result.parts_left_out:
            record["parts_left_out"] = result.parts_left_out
    return record


def overlay_name(path: Path) -> str:
    """``<stem>.png``, with a digest of the folder so that same-named inputs never collide."""
    folder = hashlib.sha1(str(path.parent.absolute()).encode()).hexdigest()[:8]
    return f"{path.stem}-{folder}.png"


def render_overlay(image: np.ndarray, mask: np.ndarray, defects: Sequence[Defect]) -> bytes:
    """PNG bytes: the image with the predicted mask tinted red and each defect's box drawn
    with its area."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([255, 0, 0], np.float32)
    overlay = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    for defect in defects:
        x1, y1, x2, y2 = defect.box
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 0), width=2)
        draw.text((x1, max(0, y1 - 12)), f"{defect.area} px", fill=(255, 255, 0))
    encoded = io.BytesIO()
    # zlib level 1: on a 512x512 DAGM overlay 22 ms and 357 KiB against 98 ms and 446 KiB at
    # Pillow's default 6 (the texture barely compresses; the same pixels either way).
    overlay.save(encoded, format="PNG", compress_level=1)
    return encoded.getvalue()


def write_overlay(path: Path, image: np.ndarray, result: Result) -> None:
    """`render_overlay` of a result, written atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_overlay(image, result.mask, result.defects))


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
    inspector: Inspector,
    paths: list[Path],
    out_dir: str | os.PathLike,
    options: PredictOptions = PredictOptions(),
    models: Sequence[str] | None = None,
) -> dict:
    """Inspect ``paths`` and write their records (and overlays); returns ``{"images",
    "failed", "skipped"}`` counts. ``models``: each path's model, where the inspector has
    several (its records then name it).

    ``out_dir`` is locked while the run uses it: a second run on it stops with
    FolderInUseError instead of interleaving its records with this one's.
    """
    out_dir = Path(out_dir)
    with exclusive_lock(out_dir, "predict.py run"):
        return _predict_files(inspector, paths, out_dir, options, models)


def _predict_files(
    inspector: Inspector, paths, out_dir: Path, options: PredictOptions, models
) -> dict:
    done = finished_files(out_dir) if options.resume else set()
    if not options.resume:
        (out_dir / RECORDS_FILE).unlink(missing_ok=True)
    names = inspector.model_names(models, len(paths))
    todo = [(p, name) for p, name in zip(paths, names, strict=True) if resume_key(p) not in done]
    counts = {"images": 0, "failed": 0, "skipped": len(paths) - len(todo)}
    progress = tqdm(total=len(todo), desc="predict", unit="img", disable=not options.progress)
    inspected = inspector.inspect_files(
        [p for p, _ in todo],
        keep_masks=options.overlays,
        keep_images=options.overlays,
        decode_threads=options.decode_threads,
        model=[name for _, name in todo],
    )
    several = len(inspector.models) > 1
    records_file = out_dir / RECORDS_FILE
    with (
        records_file.open("a", encoding="utf-8", errors="surrogateescape") as records,
        ThreadPoolExecutor(OVERLAY_WRITERS, thread_name_prefix="predict-overlay") as overlays,
    ):
        waiting: list[tuple[dict, object]] = []  # records whose overlays are being written

        def write_waiting() -> None:
            for record, written in waiting:
                if written is not None:
                    written.result()  # written (or its error raised) before its record
                records.write(json.dumps(record) + "\n")
            records.flush()
            waiting.clear()

        for path, result in inspected:
            record = image_record(path, result)
            if several:
                record["model"] = result.model
            written = None
            if result.error is not None:
                write_waiting()
                print(f"error: {result.error}", file=sys.stderr)
                counts["failed"] += 1
            else:
                counts["images"] += 1
                if result.mask is not None:
                    name = overlay_name(path)
                    written = overlays.submit(
                        write_overlay, out_dir / "overlays" / name, result.image, result
                    )
                    record["overlay"] = str(Path("overlays") / name)
                elif options.overlays:
                    record["overlay_skipped"] = (
                        f"over {inspector.options.tile_above} pixels (--tile-above)"
                    )
            waiting.append((record, written))
            if len(waiting) >= RECORDS_WAITING or result.error is not None:
                write_waiting()
            progress.update(1)
        write_waiting()
    progress.close()
    write_summaries(out_dir)
    return counts


def write_summaries(out_dir: Path) -> None:
    """``defects.json`` (all records) and ``defects.csv`` (a row per defect, and per image
    without defects or with an error) from ``defects.jsonl``."""
    records = {}
    for record in read_records(out_dir):
        # a re-run's record replaces an older one
        records[record.get("key", record["file"])] = record
    write_atomic(out_dir / "defects.json", json.dumps(list(records.values()), indent=2) + "\n")
    columns = ["file", "verdict", "x1", "y1", "x2", "y2", "area", "score", "error"]
    if any("model" in record for record in records.values()):
        columns.insert(1, "model")  # a run of several models (predict.py --route)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    for record in records.values():
        base = {"file": record["file"], "verdict": record.get("verdict", "ERROR")}
        if "model" in columns:
            base["model"] = record.get("model", "")
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
