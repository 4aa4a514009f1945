"""How often `--dtype bfloat16` changes a pixel's verdict: the authors' checkpoints on the 10 real
DAGM samples, the detector's masks in bfloat16 against float32.

    .venv/bin/python benchmarks/bfloat16_agreement.py [--features 1,2,4,8,16,32,64,128]
        [--json out/bfloat16_agreement.json]

Needs ``../shared`` (the checkpoints and the samples) beside the checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cheapnet_jax import data, load_torch_checkpoint
from cheapnet_jax.bench import format_table, write_json
from cheapnet_jax.detection import make_detector

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = SHARED / "torch-checkpoints"
SAMPLES = SHARED / "dagm-samples" / "Class6" / "Train"


def masks_of(detector, variables, images: np.ndarray, batch: int = 2) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(detector(variables, jnp.asarray(images[i : i + batch])).masks)
            for i in range(0, len(images), batch)
        ]
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--json", default="out/bfloat16_agreement.json")
    args = parser.parse_args(argv)
    images = np.stack([data.read_sample(s)[0] for s in data.list_dagm_samples(SAMPLES)])
    normalization = (data.CLASS6_MEAN, data.CLASS6_STD)
    rows = []
    for features in map(int, args.features.split(",")):
        model, variables = load_torch_checkpoint(CHECKPOINTS / f"CheapNet_G{features}.pkl")
        masks = {
            dtype: masks_of(
                make_detector(model, dtype=dtype, normalization=normalization), variables, images
            )
            for dtype in ("float32", "bfloat16")
        }
        flipped = int(np.sum(masks["float32"] != masks["bfloat16"]))
        rows.append(
            {
                "G": features,
                "pixels unchanged": f"{100 * (1 - flipped / masks['float32'].size):.3f}%",
                "pixels flipped": flipped,
                "defect pixels (float32)": int(masks["float32"].sum()),
            }
        )
        print(rows[-1], file=sys.stderr)
    print(format_table(rows, list(rows[0])))
    write_json(args.json, rows, pixels=int(images.size))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
