"""Input pipeline throughput: how many images/s the host delivers, against what the model eats.

    .venv/bin/python benchmarks/pipeline.py [--repeat 5] [--json out/pipeline.json]

Measures, on the real DAGM samples in ../shared when present (else synthetic PNGs written to a
temporary DAGM folder): PNG decoding of image + label with one and two threads (`data.load_samples`,
which reads a training split), evaluate.py's batches (`data.iterate_batches`), predict.py's
decoding, and training's in-memory batch preparation (normalise + shard for 8 devices).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cheapnet_jax import data  # noqa: E402
from cheapnet_jax.bench import format_table, time_call, write_json  # noqa: E402
from cheapnet_jax.synthetic import write_dagm_folder  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "dagm-samples" / "Class6" / "Train"


def read_grayscale_or_converted(path: Path):
    """What `Inspector.inspect_files` decodes: colour converted, with a warning."""
    return data.load_image(path, convert_to_grayscale=True)


def images_per_second(run, images: int, repeat: int) -> float:
    """Images per second of the fastest of ``repeat`` passes (no warm-up pass)."""
    return images / time_call(run, warmup=0, runs=repeat).min_s


def measure(folder: Path, repeat: int) -> list[dict]:
    # Each pass reads the folder's files four times over, so that thread start-up is amortised.
    samples = data.list_dagm_samples(folder) * 4
    paths = [s.image_path for s in samples]
    images, masks = data.load_samples(samples[:8])
    order = np.arange(len(images))
    rows = [
        {
            "stage": f"decode image + label PNG ({workers} thread{'s' * (workers > 1)})",
            "img/s": images_per_second(
                lambda workers=workers: data.load_samples(samples, workers), len(samples), repeat
            ),
        }
        for workers in (1, 2)
    ]
    rows += [
        {
            "stage": "evaluate.py batches of 2 (2 threads)",
            "img/s": images_per_second(
                lambda: list(data.iterate_batches(samples, 2)), len(samples), repeat
            ),
        },
        {
            "stage": "predict.py decode (2 threads)",
            "img/s": images_per_second(
                lambda: list(data.threaded_map(read_grayscale_or_converted, paths)),
                len(paths),
                repeat,
            ),
        },
        {
            "stage": "training batch: normalise + shard (in memory)",
            "img/s": images_per_second(
                lambda: data.shard_batch(data.normalize(images[order[:8]]), 8), 8, repeat * 20
            ),
        },
    ]
    for row in rows:
        row["images"] = f"{len(samples)} x {images.shape[1]}x{images.shape[2]}"
    rows[-1]["images"] = f"batches of 8 x {images.shape[1]}x{images.shape[2]}"
    del masks
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default="out/pipeline.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = SAMPLES if SAMPLES.is_dir() else write_dagm_folder(Path(scratch), 10, 512)
        rows = measure(folder, args.repeat)
    print(format_table(rows, ["stage", "images", "img/s"]))
    write_json(args.json, rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
