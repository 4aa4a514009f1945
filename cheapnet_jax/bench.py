"""Timing harness shared by `evaluate.py --jit-bench` and `benchmarks/`.

Every measurement blocks on the result (`jax.block_until_ready`) and reports the median of
many runs after a warm-up, with the spread; compile time is measured apart.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from cheapnet_jax import HOST_ALLOCATOR


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, fastest and slowest of ``runs`` timed calls."""

    median_s: float
    min_s: float
    max_s: float
    runs: int


def time_call(fn: Callable[[], object], *, warmup: int = 2, runs: int = 10) -> Timing:
    """Time ``fn()`` (its result blocked on) ``runs`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), runs)


def time_compile(jitted: Callable, *args) -> float:
    """Seconds to lower and compile ``jitted`` for ``args`` (nothing runs)."""
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - start


def _cpuinfo_field(field: str) -> str | None:
    """The first ``field`` of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_vector_extensions() -> str:
    """The CPU's SIMD extensions that XLA:CPU and ONNX Runtime choose kernels by (from
    /proc/cpuinfo), e.g. ``"avx2 fma avx512f avx512bw avx512_vnni"``; ``"unknown"`` elsewhere."""
    flags = (_cpuinfo_field("flags") or "").split()
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
    wanted += ("amx_tile",)
    found = [flag for flag in wanted if flag in flags]
    return " ".join(found) if found else "unknown"


def machine_description() -> dict:
    """What the figures were measured on."""
    device = jax.devices()[0]
    return {
        "cpu": _cpu_model(),
        "cpu_vector_extensions": cpu_vector_extensions(),
        "cores": os.cpu_count(),
        "host_allocator": HOST_ALLOCATOR,
        "jax_backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows of dicts as an aligned Markdown table (floats with 4 significant digits)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, rows: Sequence[dict], **extra) -> None:
    """Write ``{"machine": ..., "rows": rows, **extra}``, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_description(), **extra, "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")


def jit_bench_row(
    features: int, batch: int, image_size: int, runs: int, dtype: str = "float32"
) -> dict:
    """Compile time, latency and throughput of segmentation and of segmentation + labeling,
    from uint8 images (normalised on the device) to probabilities or defects."""
    from cheapnet_jax.detection import make_detector, network_probabilities
    from cheapnet_jax.flops import count_params, paper_gflops, xla_gflops
    from cheapnet_jax.model import CheapNet, init_variables

    model = CheapNet(features)
    variables = init_variables(model, jax.random.key(0))
    shape = (batch, image_size, image_size)
    x = jax.random.randint(jax.random.key(1), shape, 0, 256).astype(jnp.uint8)
    mean_std = (0.5, 0.25)

    segment = jax.jit(
        functools.partial(network_probabilities, model, dtype=dtype, normalization=mean_std)
    )
    detect = make_detector(model, dtype=dtype, normalization=mean_std)
    row = {
        "G": features,
        "batch": batch,
        "dtype": dtype,
        "params": count_params(variables),
        "GFLOPs xla": xla_gflops(model, variables, image_size, image_size),
        "GFLOPs paper": paper_gflops(features, image_size, image_size),
    }
    for name, fn in (("seg", segment), ("seg+label", detect)):
        row[f"{name} compile s"] = time_compile(fn, variables, x)
        timing = time_call(lambda fn=fn: fn(variables, x), runs=runs)
        row[f"{name} img/s"] = batch / timing.median_s
        row[f"{name} ms/img"] = 1e3 * timing.median_s / batch
        row[f"{name} ms/batch"] = 1e3 * timing.median_s
        row[f"{name} spread ms"] = 1e3 * (timing.max_s - timing.min_s)
    return row


def run_jit_bench(
    features: Sequence[int],
    batch_sizes: Sequence[int],
    image_size: int,
    runs: int,
    json_path: str | None = None,
    dtype: str = "float32",
) -> list[dict]:
    """`evaluate.py --jit-bench`: print (and write) one row per model and batch size."""
    machine = machine_description()
    print(
        f"device: {machine['device']} ({machine['jax_backend']}), {machine['cpu']} "
        f"({machine['cpu_vector_extensions']}), {machine['cores']} cores, jax {machine['jax']}, "
        f"host memory {machine['host_allocator']}; {image_size}x{image_size}, "
        f"medians of {runs} runs after warm-up"
    )
    if machine["jax_backend"] == "cpu":
        from cheapnet_jax.labeling import opencv_available

        labeler = "OpenCV (CCL_SAUF)" if opencv_available() else "scipy.ndimage"
        print(f"CPU forms: fused layers (impl='auto'); labeler {labeler} in a host callback")
    rows = []
    for g in features:
        for batch in batch_sizes:
            rows.append(jit_bench_row(g, batch, image_size, runs, dtype))
    columns = ["G", "batch", "dtype", "params", "GFLOPs xla", "GFLOPs paper"] + [
        f"{name} {what}"
        for name in ("seg", "seg+label")
        for what in ("img/s", "ms/img", "ms/batch", "spread ms", "compile s")
    ]
    print(format_table(rows, columns))
    if json_path:
        write_json(json_path, rows, image_size=image_size, runs=runs)
        print(f"wrote {json_path}")
    return rows
