"""CheapNet inference side by side: JAX (fused and lax paths) vs PyTorch eager vs ONNX Runtime
vs OpenVINO.

    .venv/bin/python benchmarks/inference.py [--features 2,32] [--batch-sizes 1,8] \
        [--rounds 10] [--calls 3] [--json out/inference.json] [--xla-max-isa AVX2]

All frameworks run the same weights (the authors' checkpoints from ../shared when present,
else random ones) on 512x512 float32 input, in one process, interleaved: each round runs every
framework in turn, untimed calls for 0.1 s then ``--calls`` timed calls in a row, so that machine
noise hits all of them alike. Reports the
median images/s and ratios, and the CPU with its vector extensions. Needs the extras `torch`
and `bench` (ONNX Runtime); OpenVINO (`pip install openvino`) runs the same ONNX graph where it
is installed. ``--xla-max-isa AVX2`` limits JAX's code generation to AVX2 (the other frameworks
keep what the CPU has): a pessimistic stand-in for an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# cheapnet_jax first, before torch or JAX start threads (cheapnet_jax.host_allocator).
import cheapnet_jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the independent PyTorch CheapNet of the tests

import torch  # noqa: E402
from torch_reference import TorchCheapNet  # noqa: E402

from cheapnet_jax import CheapNet  # noqa: E402
from cheapnet_jax.bench import format_table, machine_description, write_json  # noqa: E402
from cheapnet_jax.model import inference_logits  # noqa: E402
from cheapnet_jax.torch_import import state_dict_to_variables  # noqa: E402

CHECKPOINTS = ROOT.parent / "shared" / "torch-checkpoints"
SIZE = 512
WARM_S = 0.1


def torch_model(features: int) -> TorchCheapNet:
    model = TorchCheapNet(features)
    path = CHECKPOINTS / f"CheapNet_G{features}.pkl"
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)["CheapNet"]
        model.load_state_dict(state)
    return model.eval()


def onnx_graph(model: TorchCheapNet) -> bytes:
    buffer = io.BytesIO()
    example = torch.zeros(1, 1, SIZE, SIZE)
    torch.onnx.export(
        model,
        (example,),
        buffer,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    return buffer.getvalue()


def onnx_session(graph: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(graph, options, ["CPUExecutionProvider"])


def openvino_model(graph: bytes, batch: int):
    """The ONNX graph compiled by OpenVINO for the CPU at a fixed batch (latency hint: one
    request at a time, as the other frameworks run)."""
    import openvino

    core = openvino.Core()
    model = core.read_model(graph)
    model.reshape({"x": [batch, 1, SIZE, SIZE]})
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})


def runners(features: int, batch: int) -> dict:
    reference = torch_model(features)
    variables = state_dict_to_variables(reference.state_dict())
    x = np.random.default_rng(0).standard_normal((batch, SIZE, SIZE, 1)).astype(np.float32)
    x_jax = jnp.asarray(x)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    x_torch = torch.from_numpy(x_nchw)
    found = {}
    for impl in ("fused", "lax"):
        model = CheapNet(features, impl=impl)
        fn = jax.jit(
            lambda v, batch, model=model: jax.nn.sigmoid(inference_logits(model, v, batch))
        )
        found[f"jax {impl}"] = lambda fn=fn: fn(variables, x_jax).block_until_ready()

    def torch_run():
        with torch.inference_mode():
            return torch.sigmoid(reference(x_torch))

    found["pytorch eager"] = torch_run
    graph = onnx_graph(reference)
    try:
        session = onnx_session(graph)
        found["onnxruntime"] = lambda: session.run(None, {"x": x_nchw})
    except ImportError as err:
        print(f"ONNX Runtime skipped: {err}", file=sys.stderr)
    try:
        compiled = openvino_model(graph, batch)
        request = compiled.create_infer_request()
        found["openvino"] = lambda: request.infer({"x": x_nchw})
    except ImportError as err:
        print(f"OpenVINO skipped: {err}", file=sys.stderr)
    return found


def measure(features: int, batch: int, rounds: int, calls: int) -> dict:
    candidates = runners(features, batch)
    if features >= 32 and batch > 1:
        candidates.pop("jax lax")  # the reference path takes about 0.7 s per image there
    for run in candidates.values():  # compile / warm up
        run()
        run()
    seconds = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            # A burst per framework after untimed calls for WARM_S: the previous framework's
            # worker threads spin for a while after their last call, and on the VMs measured a
            # core that was left idle comes back slowly, over 10-40 ms (BENCHMARKS.md,
            # "Inference on AMD EPYC").
            warm_until = time.perf_counter() + WARM_S
            run()
            while time.perf_counter() < warm_until:
                run()
            for _ in range(calls):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    row = {"G": features, "batch": batch}
    for name, values in seconds.items():
        row[f"{name} img/s"] = batch / statistics.median(values)
    jax_rate = row["jax fused img/s"]
    row["jax / pytorch"] = jax_rate / row["pytorch eager img/s"]
    for other in ("onnxruntime", "openvino"):
        if f"{other} img/s" in row:
            row[f"jax / {other}"] = jax_rate / row[f"{other} img/s"]
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default="2,32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default="out/inference.json")
    parser.add_argument(
        "--calls", type=int, default=3, help="timed calls per framework and round, in a row"
    )
    parser.add_argument(
        "--xla-max-isa",
        help="limit XLA:CPU's code generation (e.g. AVX2) to stand in for an older CPU",
    )
    args = parser.parse_args(argv)
    if args.xla_max_isa:  # read when JAX's CPU backend starts, which has not happened yet
        flag = f"--xla_cpu_max_isa={args.xla_max_isa}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    rows = []
    for features in (int(g) for g in args.features.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            rows.append(measure(features, batch, args.rounds, args.calls))
            print(f"G={features} batch={batch}: done", file=sys.stderr)
    columns = sorted(
        {key for row in rows for key in row}, key=lambda k: (k not in ("G", "batch"), k)
    )
    machine = machine_description()
    isa = f", JAX code limited to {args.xla_max_isa}" if args.xla_max_isa else ""
    print(
        f"CheapNet {SIZE}x{SIZE} float32 inference (sigmoid included), median of interleaved "
        f"runs; {machine['cpu']} ({machine['cpu_vector_extensions']}), {machine['cores']} "
        f"cores, host memory {cheapnet_jax.HOST_ALLOCATOR}{isa}"
    )
    print(format_table(rows, columns))
    write_json(
        args.json,
        rows,
        torch_threads=torch.get_num_threads(),
        rounds=args.rounds,
        calls=args.calls,
        xla_max_isa=args.xla_max_isa,
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
