"""Input pipeline throughput: how many images/s the host delivers, against what the model eats.

    .venv/bin/python benchmarks/pipeline.py [--repeat 5] [--json out/pipeline.json]

Measures, on the real DAGM samples in ../shared when present (else synthetic PNGs written to a
temporary DAGM folder): PNG decoding of image + label (`data.iterate_batches`, one thread),
predict.py's decoding with its two threads, and training's in-memory batch preparation
(normalise + shard for 8 devices).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cheapnet_jax import data  # noqa: E402
from cheapnet_jax.bench import format_table, write_json  # noqa: E402
from cheapnet_jax.prediction import read_image  # noqa: E402
from cheapnet_jax.synthetic import write_dagm_folder  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "dagm-samples" / "Class6" / "Train"


def images_per_second(run, images: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return images / best


def decode_threaded(paths: list[Path]) -> list:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(read_image, paths))


def measure(folder: Path, repeat: int) -> list[dict]:
    samples = data.list_dagm_samples(folder)
    paths = [s.image_path for s in samples]
    images, masks = data.load_samples(samples)
    order = np.arange(len(images))
    rows = [
        {
            "stage": "decode image + label PNG (1 thread)",
            "img/s": images_per_second(
                lambda: list(data.iterate_batches(samples, 8)), len(samples), repeat
            ),
        },
        {
            "stage": "predict.py decode (2 threads)",
            "img/s": images_per_second(lambda: decode_threaded(paths), len(paths), repeat),
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
