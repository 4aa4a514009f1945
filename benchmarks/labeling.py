"""Connected-component labeling side by side: this project's labelers vs scipy and OpenCV.

    .venv/bin/python benchmarks/labeling.py [--batch 8] [--runs 10] [--json out/labeling.json]

Per 512x512 mask, on predicted masks (CheapNet-M on the real DAGM samples when ../shared is
there, else thresholded smooth noise), random noise and adversarial shapes; every labeler
produces labels *and* boxes/areas. OpenCV (`opencv-python-headless`) is optional.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the adversarial shapes of the tests

from mask_shapes import comb, serpentine, spiral  # noqa: E402

from cheapnet_jax.bench import format_table, time_call, write_json  # noqa: E402
from cheapnet_jax.labeling import component_stats, label_components, union_find_labels  # noqa: E402

SIZE = 512
SAMPLES = ROOT.parent / "shared" / "dagm-samples" / "Class6" / "Train"
CHECKPOINT = ROOT.parent / "shared" / "torch-checkpoints" / "CheapNet_G32.pkl"


def predicted_masks(batch: int) -> tuple[str, np.ndarray]:
    if SAMPLES.is_dir() and CHECKPOINT.is_file():
        from cheapnet_jax import load_torch_checkpoint
        from cheapnet_jax.data import list_dagm_samples, normalize, read_sample

        model, variables = load_torch_checkpoint(CHECKPOINT)
        images = [read_sample(s)[0] for s in list_dagm_samples(SAMPLES)[:batch]]
        logits = jax.jit(model.apply)(variables, jnp.asarray(normalize(np.stack(images))))
        masks = np.asarray(jax.nn.sigmoid(logits)[..., 0] > 0.5)
        return "predicted (G=32, DAGM)", np.resize(masks, (batch, SIZE, SIZE))
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.standard_normal((batch, SIZE, SIZE)), (0, 6, 6))
    return "predicted-like (smooth noise)", smooth > 0.08


def mask_sets(batch: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    sets = [predicted_masks(batch)]
    for density in (0.05, 0.3, 0.5, 0.7):
        sets.append((f"noise {density}", rng.random((batch, SIZE, SIZE)) < density))
    for name, mask in (
        ("spiral", spiral(SIZE)),
        ("serpentine", serpentine(SIZE, SIZE)),
        ("comb", comb(SIZE, SIZE)),
    ):
        sets.append((name, np.broadcast_to(mask, (batch, SIZE, SIZE)).copy()))
    return sets


def jax_labeler(method: str, max_components: int):
    @jax.jit
    def run(masks):
        labels, counts = label_components(masks, 8, method=method)
        return counts, component_stats(labels, max_components, method=method)

    return run


def scipy_labeler(masks: np.ndarray) -> list:
    out = []
    for mask in masks:
        labels, count = ndimage.label(mask, np.ones((3, 3), bool))
        boxes = ndimage.find_objects(labels)
        areas = np.bincount(labels.ravel())[1:]
        out.append((count, boxes, areas))
    return out


def opencv_labeler():
    try:
        import cv2
    except ImportError:
        return None

    def run(masks: np.ndarray) -> list:
        return [cv2.connectedComponentsWithStats(m, connectivity=8) for m in masks]

    return run


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="masks per call")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", default="out/labeling.json")
    args = parser.parse_args(argv)

    max_components = 256  # what the detector keeps by default
    labelers = {
        "jax union-find": jax_labeler("union_find", max_components),
        "jax host-callback": jax_labeler("scipy", max_components),
    }
    opencv = opencv_labeler()
    rows = []
    for name, masks in mask_sets(args.batch):
        device_masks = jnp.asarray(masks)
        row = {"masks": name}
        for label, fn in labelers.items():
            timing = time_call(lambda fn=fn, m=device_masks: fn(m), runs=args.runs)
            row[f"{label} ms"] = 1e3 * timing.median_s / args.batch
        iterations = union_find_labels(device_masks, 8)[2]
        row["union-find rounds"] = int(jnp.max(iterations))
        timing = time_call(lambda masks=masks: scipy_labeler(masks), warmup=1, runs=args.runs)
        row["scipy ms"] = 1e3 * timing.median_s / args.batch
        if opencv is not None:
            bytes_masks = masks.astype(np.uint8)
            timing = time_call(lambda m=bytes_masks: opencv(m), warmup=1, runs=args.runs)
            row["opencv ms"] = 1e3 * timing.median_s / args.batch
            for label in labelers:
                row[f"{label} / opencv"] = row[f"{label} ms"] / row["opencv ms"]
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    columns = list(rows[0])
    print(f"ms per {SIZE}x{SIZE} mask (labels + boxes + areas, 8-connectivity), batch {args.batch}")
    print(format_table(rows, columns))
    write_json(args.json, rows, batch=args.batch, size=SIZE)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
