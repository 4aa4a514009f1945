"""Connected-component labeling side by side: this project's labelers vs scipy and OpenCV.

    .venv/bin/python benchmarks/labeling.py [--batch 8] [--runs 10] [--json out/labeling.json]

Per 512x512 mask, on predicted masks (CheapNet-M on the real DAGM samples when ../shared is
there, else thresholded smooth noise), random noise and adversarial shapes; every labeler
produces labels *and* boxes/areas. OpenCV (`opencv-python-headless`) is optional; where it is
installed it is also the CPU default's host labeler (`jax opencv callback`: OpenCV's CCL_SAUF
inside the compiled program, through `jax.pure_callback`).

`previous union-find` is the per-pixel labeler this project shipped before the block-based one
(commit 742b00d: per-mask while loops under vmap, every non-edge hooked into entry 0, per-pixel
segment reductions), kept here, and only here, as the baseline of the speed-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the adversarial shapes of the tests

from mask_shapes import comb, serpentine, spiral  # noqa: E402

from cheapnet_jax.bench import (  # noqa: E402
    format_table,
    machine_description,
    time_call,
    write_json,
)
from cheapnet_jax.labeling import (  # noqa: E402
    label_and_measure,
    opencv_available,
    union_find_labels,
)

SIZE = 512
SAMPLES = ROOT.parent / "shared" / "dagm-samples" / "Class6" / "Train"
CHECKPOINT = ROOT.parent / "shared" / "torch-checkpoints" / "CheapNet_G32.pkl"


def _previous_compress(parent: jax.Array) -> jax.Array:
    """Pointer jumping until every entry points at its root."""

    def not_done(state):
        return state[1]

    def jump(state):
        current, _ = state
        jumped = current[current]
        return jumped, jnp.any(jumped != current)

    return lax.while_loop(not_done, jump, (parent, jnp.array(True)))[0]


def _previous_union_find_single(
    mask: jax.Array, connectivity: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One mask [H, W] -> (labels [H, W] int32, count, iterations)."""
    height, width = mask.shape
    size = height * width
    index = jnp.arange(size, dtype=jnp.int32).reshape(height, width)
    cols = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (height, width))

    # Runs: every foreground pixel points at the first pixel of its horizontal run.
    left = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    run_start_col = lax.cummax(jnp.where(mask & ~left, cols, -1), axis=1)
    parent = jnp.where(mask, index - cols + run_start_col, index).reshape(-1)

    # Edges to the row above: straight up, and the two diagonals for 8-connectivity.
    offsets = [(-1, 0)] if connectivity == 4 else [(-1, -1), (-1, 0), (-1, 1)]
    sources, targets = [], []
    padded = jnp.pad(mask, 1)
    padded_index = jnp.pad(index, 1)
    for d_row, d_col in offsets:
        window = (slice(1 + d_row, 1 + d_row + height), slice(1 + d_col, 1 + d_col + width))
        neighbour, neighbour_index = padded[window], padded_index[window]
        edge = mask & neighbour
        sources.append(jnp.where(edge, index, 0).reshape(-1))
        targets.append(jnp.where(edge, neighbour_index, 0).reshape(-1))
    sources = jnp.concatenate(sources)
    targets = jnp.concatenate(targets)

    def not_converged(state):
        return state[1]

    def hook(state):
        parent, _, iterations = state
        parent = _previous_compress(parent)
        root_a, root_b = parent[sources], parent[targets]
        low, high = jnp.minimum(root_a, root_b), jnp.maximum(root_a, root_b)
        hooked = parent.at[high].min(low)
        return hooked, jnp.any(hooked != parent), iterations + 1

    parent, _, iterations = lax.while_loop(
        not_converged, hook, (parent, jnp.array(True), jnp.array(0, jnp.int32))
    )
    parent = _previous_compress(parent)
    flat_mask = mask.reshape(-1)
    is_root = flat_mask & (parent == jnp.arange(size, dtype=jnp.int32))
    number = jnp.cumsum(is_root.astype(jnp.int32))
    labels = jnp.where(flat_mask, number[parent], 0).reshape(height, width)
    return labels, number[-1] if size else jnp.array(0, jnp.int32), iterations


def previous_labeler(max_components: int):
    @jax.jit
    def run(masks):
        labels, counts, _ = jax.vmap(lambda m: _previous_union_find_single(m, 8))(masks)
        height, width = masks.shape[1:]
        rows = jnp.broadcast_to(jnp.arange(height)[:, None], (height, width)).reshape(-1)
        cols = jnp.broadcast_to(jnp.arange(width)[None, :], (height, width)).reshape(-1)
        segments = max_components + 1

        def single(label_image):
            ids = jnp.where(label_image > max_components, 0, label_image).reshape(-1)
            return jnp.stack(
                [
                    jax.ops.segment_min(cols, ids, segments),
                    jax.ops.segment_min(rows, ids, segments),
                    jax.ops.segment_max(cols, ids, segments),
                    jax.ops.segment_max(rows, ids, segments),
                    jax.ops.segment_sum(jnp.ones_like(ids), ids, segments),
                ],
                axis=-1,
            )[1:]

        return counts, jax.vmap(single)(labels)

    return run


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
        _, counts, stats = label_and_measure(masks, 8, max_components, method=method)
        return counts, stats

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
        "previous union-find": previous_labeler(max_components),
        "jax union-find": jax_labeler("union_find", max_components),
        "jax scipy callback": jax_labeler("scipy", max_components),
    }
    if opencv_available():  # the CPU default where OpenCV is installed
        labelers["jax opencv callback"] = jax_labeler("opencv", max_components)
    opencv = opencv_labeler()
    rows = []
    for name, masks in mask_sets(args.batch):
        device_masks = jnp.asarray(masks)
        row = {"masks": name}
        for label, fn in labelers.items():
            timing = time_call(lambda fn=fn, m=device_masks: fn(m), runs=args.runs)
            row[f"{label} ms"] = 1e3 * timing.median_s / args.batch
        row["union-find rounds"] = int(union_find_labels(device_masks, 8)[2])
        row["speed-up over previous"] = row["previous union-find ms"] / row["jax union-find ms"]
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
    machine = machine_description()
    default = "opencv callback" if opencv_available() else "scipy callback"
    print(
        f"ms per {SIZE}x{SIZE} mask (labels + boxes + areas, 8-connectivity), batch "
        f"{args.batch}; {machine['cpu']} ({machine['cpu_vector_extensions']}), "
        f"{machine['cores']} cores; the CPU default (method='auto') is the jax {default}"
    )
    print(format_table(rows, columns))
    write_json(args.json, rows, batch=args.batch, size=SIZE, cpu_default=f"jax {default}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
