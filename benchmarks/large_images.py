"""predict.py on images far larger than memory allows whole: time and peak memory, tiled.

    .venv/bin/python benchmarks/large_images.py [--variants 2,32] [--work /tmp/cheapnet-large]
        [--json out/large_images.json]

Writes two test images once (a 16,384 x 16,384 frame and a 2,048-wide, 100,000-row line-scan
strip: mosaics of the 10 real DAGM samples in ``../shared``, PNG) and runs ``predict.py`` on
each, a new process per run, with the authors' checkpoints of the given widths
(``../shared/torch-checkpoints``). Peak
memory is the process's maximum resident set (``wait4``'s ``ru_maxrss``), which includes the
decoded image (1 byte a pixel, held once by Pillow and once by numpy while decoding). For
contrast, a 4,096 x 4,096 image runs both whole and tiled: whole-image memory grows with the
image, tiled memory with the tile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cheapnet_jax.bench import format_table, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO_ROOT.parent / "shared" / "torch-checkpoints"
SAMPLES = REPO_ROOT.parent / "shared" / "dagm-samples" / "Class6" / "Train"
IMAGES = {  # name: (height, width)
    "frame 16384x16384": (16384, 16384),
    "strip 2048x100000": (100000, 2048),
    "frame 4096x4096": (4096, 4096),
}


def mosaic(height: int, width: int, seed: int) -> np.ndarray:
    """The real DAGM Class 6 samples (``../shared/dagm-samples``), flipped at random and laid
    side by side: real texture and real defects at every scale of image."""
    samples = [np.asarray(Image.open(p)) for p in sorted(SAMPLES.glob("*.PNG"))]
    rng = np.random.default_rng(seed)
    image = np.empty((height, width), np.uint8)
    side = samples[0].shape[0]
    for top in range(0, height, side):
        for left in range(0, width, side):
            cell = samples[rng.integers(len(samples))][
                :: rng.choice([1, -1]), :: rng.choice([1, -1])
            ]
            rows, cols = min(side, height - top), min(side, width - left)
            image[top : top + rows, left : left + cols] = cell[:rows, :cols]
    return image


def ensure_image(work: Path, name: str) -> Path:
    height, width = IMAGES[name]
    path = work / f"{name.replace(' ', '-')}.png"
    if not path.is_file():
        print(f"writing {path}", file=sys.stderr)
        Image.fromarray(mosaic(height, width, seed=height + width)).save(path, compress_level=1)
    return path


def run_predict(checkpoint: Path, image: Path, out: Path, *extra: str) -> dict:
    """One predict.py process: wall seconds, peak RSS (bytes), defects found, tiles."""
    command = [
        sys.executable,
        str(REPO_ROOT / "predict.py"),
        "--checkpoint",
        str(checkpoint),
        str(image),
        "--out",
        str(out),
        "--no-progress",
        "--no-overlays",
        "--max-image-pixels",
        str(300_000_000),
        "--max-components",
        str(1_000_000),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    (record,) = json.loads((out / "defects.json").read_text())
    return {
        "seconds": seconds,
        "peak_rss": usage.ru_maxrss * 1024,
        "defects": len(record["defects"]),
        "tiles": record.get("tiles", 0),
        "boxes": [[*d["box"], d["area"]] for d in record["defects"]],
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="2,32", help="checkpoint widths G")
    parser.add_argument("--images", default=",".join(IMAGES), help="which of the images")
    parser.add_argument("--work", default="/tmp/cheapnet-large", help="images and outputs")
    parser.add_argument("--json", default="out/large_images.json")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.images.split(","):
        image = ensure_image(work, name)
        height, width = IMAGES[name]
        modes = {"tiled 1024": []}
        if height * width <= 4096 * 4096:
            modes["whole"] = ["--tile-above", str(height * width)]
        for features in (int(g) for g in args.variants.split(",")):
            found = {}
            for mode, extra in modes.items():
                out = work / f"out-G{features}-{image.stem}-{mode.replace(' ', '')}"
                result = run_predict(CHECKPOINTS / f"CheapNet_G{features}.pkl", image, out, *extra)
                rows.append(
                    {
                        "G": features,
                        "image": name,
                        "mode": mode,
                        "seconds": result["seconds"],
                        "Mpx/s": height * width / result["seconds"] / 1e6,
                        "peak RSS GiB": result["peak_rss"] / 2**30,
                        "defects": result["defects"],
                        "tiles": result["tiles"],
                    }
                )
                found[mode] = result["boxes"]
                if mode == "whole":  # the tiled run of the same image and model came first
                    rows[-1]["same defects as tiled"] = found["whole"] == found["tiled 1024"]
                print(rows[-1], file=sys.stderr)
    print(format_table(rows, list(dict.fromkeys(key for row in rows for key in row))))
    write_json(args.json, rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
