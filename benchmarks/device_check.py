"""The prepared accelerator check (issue 14): correctness on the device, then speed, one JSON.

    bash benchmarks/device_check.sh            # on the GPU machine, one command
    .venv/bin/python benchmarks/device_check.py --quick --json out/device_check_cpu.json

Runs, on whatever `jax.default_backend()` is: (1) the union-find labeler against scipy on the
test masks; (2) the model (lax and fused layers) against PyTorch (the independent model of
tests/torch_reference.py, on the GPU when torch sees one), float32 masks; (3) `--jit-bench`
rows for S, M, L (L at batch 1 and 8 only: 512x512x1024 float32 activations of a batch of 64
are tens of GB per layer), segmentation and segmentation + labeling, both layer forms; (4) the
labeler alone at batch 64 and 256; (5) one training step's throughput; (6) S and M at batch 64
with BatchNorm folded (the default) or not, float32 or bfloat16 activations; (7) one training
step of a population of 64 CheapNet-S (256x256, batch 8 each) against one solo step (issue
26). Speeds are printed as ratios to the issue's goals. Needs no pycocotools, tensorboardX or
tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inference_forms import form_rows  # noqa: E402
from mask_shapes import shapes, spiral  # noqa: E402
from population import step_seconds  # noqa: E402

from cheapnet_jax.bench import format_table, time_call, write_json  # noqa: E402
from cheapnet_jax.detection import make_detector, network_probabilities  # noqa: E402
from cheapnet_jax.labeling import label_and_measure  # noqa: E402
from cheapnet_jax.model import CheapNet, inference_logits, init_variables  # noqa: E402

GOALS = {  # images (masks) per second at 512x512 on an H100/H200-class GPU (issue 14)
    "S seg b256": 50_000,
    "S seg+label b>=64": 25_000,
    "labeler b>=64": 50_000,
}


def check_labeler() -> dict:
    found = {"masks": 0, "mismatches": []}
    run = jax.jit(
        lambda m, c: label_and_measure(m, c, 4096, method="union_find")[:2], static_argnums=1
    )
    for name, mask in shapes().items():
        for connectivity, structure in ((4, None), (8, np.ones((3, 3), bool))):
            labels, count = ndimage.label(mask, structure)
            got_labels, got_counts = run(mask[None], connectivity)
            found["masks"] += 1
            if not (
                np.array_equal(np.asarray(got_labels[0]), labels) and int(got_counts[0]) == count
            ):
                found["mismatches"].append(f"{name}/{connectivity}")
    return found


def check_model_against_torch(features: int = 8, size: int = 128) -> dict:
    import torch
    from torch_reference import TorchCheapNet

    from cheapnet_jax.torch_import import state_dict_to_variables

    torch.manual_seed(0)
    reference = TorchCheapNet(features).eval()
    for module in reference.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = np.random.default_rng(0).standard_normal((4, size, size, 1)).astype(np.float32)
    with torch.no_grad():
        expected = reference.to(device)(torch.from_numpy(x).permute(0, 3, 1, 2).to(device))
    expected = expected.permute(0, 2, 3, 1).cpu().numpy()
    variables = state_dict_to_variables(
        {k: v.cpu().numpy() for k, v in reference.state_dict().items()}
    )
    result = {"torch device": device}
    for impl in ("lax", "fused"):
        logits = np.asarray(
            jax.jit(functools.partial(inference_logits, CheapNet(features, impl=impl)))(
                variables, x
            )
        )
        result[f"{impl} max |logit diff|"] = float(np.abs(logits - expected).max())
        result[f"{impl} mask agreement"] = float(np.mean((logits > 0) == (expected > 0)))
    return result


def bench_rows(variants, batches_of, runs: int) -> list[dict]:
    rows = []
    for name, features in variants:
        model_variables = init_variables(CheapNet(features), jax.random.key(0))
        for batch in batches_of(name):
            pixels = jax.random.randint(jax.random.key(1), (batch, 512, 512), 0, 256).astype(
                jnp.uint8
            )
            for impl in ("lax", "fused"):
                model = CheapNet(features, impl=impl)
                detector = make_detector(model, normalization=(0.5, 0.25))
                segment = jax.jit(
                    functools.partial(network_probabilities, model, normalization=(0.5, 0.25))
                )
                row = {"variant": name, "impl": impl, "batch": batch}
                for what, fn in (("seg", segment), ("seg+label", detector)):
                    timing = time_call(functools.partial(fn, model_variables, pixels), runs=runs)
                    row[f"{what} img/s"] = batch / timing.median_s
                rows.append(row)
                print(row, file=sys.stderr)
    return rows


def labeler_rows(batches, runs: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    run = jax.jit(lambda m: label_and_measure(m, 8, 256, method="union_find"))
    for batch in batches:
        smooth = ndimage.gaussian_filter(rng.standard_normal((batch, 512, 512)), (0, 6, 6)) > 0.08
        for name, masks in (
            ("smooth noise", smooth),
            ("spiral", np.broadcast_to(spiral(512), (batch, 512, 512))),
        ):
            device_masks = jnp.asarray(masks)
            timing = time_call(functools.partial(run, device_masks), runs=runs)
            rows.append({"masks": name, "batch": batch, "masks/s": batch / timing.median_s})
    return rows


def training_row(features: int, batch: int, runs: int) -> dict:
    import optax

    from cheapnet_jax.data import shard_batch
    from cheapnet_jax.training import AXIS, create_state, parallel_train_step

    model = CheapNet(features, bn_axis_name=AXIS)
    optimizer = optax.adam(0.01)
    state = create_state(model, optimizer, jax.random.key(0))
    step = parallel_train_step(model, lambda: optimizer, jax.devices()[:1])
    rng = np.random.default_rng(0)
    x = shard_batch(rng.standard_normal((batch, 512, 512, 1)).astype(np.float32), 1)
    y = shard_batch(rng.random((batch, 512, 512, 1)) < 0.05, 1)
    timing = time_call(lambda: step(state, x, y)[1]["loss"], runs=runs)
    return {"G": features, "batch": batch, "train img/s": batch / timing.median_s}


def population_row(members: int, size: int, batch: int, runs: int) -> dict:
    """Issue 26: one step of a population of ``members`` CheapNet-S against one solo step, on one
    device (ms per step; a population costs about one solo run where the device is not full)."""
    solo_s, population_s = step_seconds(2, size, batch, runs, [members])
    population_s = population_s[members]
    return {
        "P": members,
        "image": size,
        "batch": batch,
        "solo ms/step": 1e3 * solo_s,
        "population ms/step": 1e3 * population_s,
        "x one solo": population_s / solo_s,
        "speedup over P solo runs": members * solo_s / population_s,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU dry run)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", default="out/device_check.json")
    args = parser.parse_args(argv)
    report = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    report["labeler vs scipy"] = check_labeler()
    print("labeler vs scipy:", report["labeler vs scipy"])
    report["model vs torch"] = check_model_against_torch()
    print("model vs torch:", report["model vs torch"])
    if args.quick:
        variants, batches_of, label_batches, train = [("S", 2)], lambda _: [1, 2], [2], (2, 2)
    else:
        variants = [("S", 2), ("M", 32), ("L", 1024)]
        batches_of = lambda name: [1, 8] if name == "L" else [1, 64, 256]  # noqa: E731
        label_batches, train = [64, 256], (2, 64)
    report["jit bench"] = bench_rows(variants, batches_of, args.runs)
    print(format_table(report["jit bench"], list(report["jit bench"][0])))
    form_batch = 2 if args.quick else 64
    report["inference forms"] = form_rows(
        [(name, features, form_batch) for name, features in variants[:2]], 1, args.runs
    )
    print(format_table(report["inference forms"], list(report["inference forms"][0])))
    report["labeler"] = labeler_rows(label_batches, args.runs)
    print(format_table(report["labeler"], list(report["labeler"][0])))
    report["training"] = training_row(*train, runs=max(args.runs // 2, 2))
    print("training:", report["training"])
    members, size = (4, 64) if args.quick else (64, 256)
    report["population"] = population_row(members, size, 8, max(args.runs // 2, 2))
    print("population:", report["population"])
    best = {
        "S seg b256": max(
            (
                r["seg img/s"]
                for r in report["jit bench"]
                if r["variant"] == "S" and r["batch"] >= 256
            ),
            default=None,
        ),
        "S seg+label b>=64": max(
            (
                r["seg+label img/s"]
                for r in report["jit bench"]
                if r["variant"] == "S" and r["batch"] >= 64
            ),
            default=None,
        ),
        "labeler b>=64": max(
            (r["masks/s"] for r in report["labeler"] if r["batch"] >= 64), default=None
        ),
    }
    report["ratios to goals"] = {k: (None if v is None else v / GOALS[k]) for k, v in best.items()}
    print("ratios to the issue's goals:", report["ratios to goals"])
    write_json(args.json, [report])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
