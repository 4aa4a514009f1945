"""One service for many models: mixed traffic over M CheapNet-S models against a one-model
service under the same load, and the memory of M models in one process against M processes.

    .venv/bin/python benchmarks/serve_models.py [--models 10] [--clients 4,16] [--duration 30] \
        [--rounds 2] [--json out/serve_models.json]

The models: the authors' G = 2 checkpoint (else random weights) and M - 1 variants of it, each
with its output bias shifted (their own answers). Each round starts, one after the other, a
service of the first model alone (POST /v1/inspect) and a service of all M (``--model
NAME=PATH`` repeated; each request's model drawn at random, POST /v1/models/NAME/inspect),
and keeps ``--clients`` clients posting the 10 real samples (uncompressed TIFF, a camera's
frame) for ``--duration`` seconds; every answer is checked against its model's in-process
answer (`Inspector`). Reported per service and client count: answers/s, p50/p99 latency,
wrong answers, resident memory; then the ratios of the M-model service to the one-model
service (median over the rounds), and the resident memory of M one-model services run side by
side (``--processes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import (  # noqa: E402  (benchmarks/serve.py)
    RawConnection,
    checkpoint,
    decode,
    encoded,
    images,
    resident_mib,
    same,
)

from cheapnet_jax.bench import format_table, machine_description, write_json  # noqa: E402
from cheapnet_jax.inspection import Inspector  # noqa: E402
from cheapnet_jax.torch_import import load_torch_checkpoint, save_torch_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_files(count: int, folder: Path) -> dict[str, Path]:
    """``count`` CheapNet-S checkpoints: the first as it is, the others with the output
    block's BatchNorm bias shifted by 0.05 per model (other masks, as trained models'
    differ)."""
    _, variables = load_torch_checkpoint(checkpoint(2, folder))
    paths = {}
    for index in range(count):
        shifted = jax.tree.map(np.asarray, variables)
        shifted["params"]["output"]["bn"]["bias"] = shifted["params"]["output"]["bn"]["bias"] + (
            0.05 * index
        )
        paths[f"product-{index}"] = folder / f"product-{index}.pkl"
        save_torch_checkpoint(shifted, paths[f"product-{index}"])
    return paths


def start(models: dict[str, Path], port: int, max_batch: int) -> subprocess.Popen:
    served = [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]
    command = [
        sys.executable, "-m", "cheapnet_jax.serve", *served, "--port", str(port),
        "--warm", "512", "--max-batch", str(max_batch), "--max-queue", "256",
        "--log-level", "warning", "--no-calibration",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        assert server.poll() is None, "the service exited"
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def request(port: int, path: str, payload: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/tiff\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def load(port: int, requests: list[tuple[bytes, list]], clients: int, duration: float):
    """``clients`` clients posting ``requests`` (prepared bytes, expected defects) in a random
    order each, for ``duration`` seconds."""
    latencies, wrong, errors = [], 0, 0
    deadline = time.monotonic() + duration

    async def client(seed: int) -> None:
        nonlocal wrong, errors
        draw = random.Random(seed)
        connection = RawConnection("127.0.0.1", port)
        while time.monotonic() < deadline:
            prepared, expected = draw.choice(requests)
            started = time.perf_counter()
            try:
                status, body = await connection.post(prepared)
            except ConnectionError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors += 1
            elif not same(json.loads(body)["defects"], expected):
                wrong += 1
        connection.close()

    began = time.monotonic()
    await asyncio.gather(*(client(seed) for seed in range(clients)))
    elapsed = time.monotonic() - began
    p50, p99 = np.quantile(latencies, [0.5, 0.99]) * 1000
    return {
        "answers_per_s": len(latencies) / elapsed,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": errors,
        "wrong": wrong,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--processes", action=argparse.BooleanOptionalAction, default=True,
        help="also measure --models one-model services side by side",
    )  # fmt: skip
    parser.add_argument("--json")
    args = parser.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        paths = model_files(args.models, Path(scratch))
        frames = [encoded(decode(p), "tiff") for p in images()]
        pixels = [decode(f) for f in frames]
        expected = {
            name: [[d.as_dict() for d in r.defects] for r in Inspector.load(path).inspect(pixels)]
            for name, path in paths.items()
        }
        first = next(iter(paths))
        rows = []
        for round_index in range(args.rounds):
            for kind in ("one model", f"{args.models} models"):
                served = {first: paths[first]} if kind == "one model" else paths
                port = free_port()
                if kind == "one model":
                    prepared = [
                        (request(port, "/v1/inspect", frame), expected[first][k])
                        for k, frame in enumerate(frames)
                    ]
                else:
                    prepared = [
                        (request(port, f"/v1/models/{name}/inspect", frame), expected[name][k])
                        for name in paths
                        for k, frame in enumerate(frames)
                    ]
                server = start(served, port, args.max_batch)
                try:
                    asyncio.run(load(port, prepared, 4, 3))  # connections and caches warm
                    for clients in clients_list:
                        figures = asyncio.run(load(port, prepared, clients, args.duration))
                        rows.append(
                            {
                                "round": round_index,
                                "service": kind,
                                "clients": clients,
                                **figures,
                                "rss_mib": resident_mib(server.pid),
                            }
                        )
                        print(format_table(rows[-1:], list(rows[-1])), flush=True)
                finally:
                    server.terminate()
                    server.wait(60)
        summary = []
        for clients in clients_list:
            one = [r for r in rows if r["clients"] == clients and r["service"] == "one model"]
            many = [r for r in rows if r["clients"] == clients and r["service"] != "one model"]
            summary.append(
                {
                    "clients": clients,
                    "answers/s ratio": statistics.median(
                        m["answers_per_s"] / o["answers_per_s"]
                        for o, m in zip(one, many, strict=True)
                    ),
                    "p99 ratio": statistics.median(
                        m["p99_ms"] / o["p99_ms"] for o, m in zip(one, many, strict=True)
                    ),
                    "memory ratio": statistics.median(
                        m["rss_mib"] / o["rss_mib"] for o, m in zip(one, many, strict=True)
                    ),
                }
            )
        separate = None
        if args.processes:
            servers = []
            try:
                for name, path in paths.items():
                    servers.append(start({name: path}, free_port(), args.max_batch))
                separate = sum(resident_mib(s.pid) for s in servers)
            finally:
                for server in servers:
                    server.terminate()
                    server.wait(60)
    machine = machine_description()
    print(f"{machine['cpu']} ({machine['cpu_vector_extensions']})")
    print(format_table(rows, list(rows[0])))
    print(format_table(summary, list(summary[0])))
    if separate is not None:
        one_rss = statistics.median(r["rss_mib"] for r in rows if r["service"] == "one model")
        many_rss = statistics.median(r["rss_mib"] for r in rows if r["service"] != "one model")
        print(
            f"resident memory: one model {one_rss:.0f} MiB, {args.models} models in one "
            f"process {many_rss:.0f} MiB, {args.models} processes {separate:.0f} MiB"
        )
    if args.json:
        write_json(
            args.json, rows, summary=summary, separate_processes_mib=separate,
            command=" ".join(sys.argv),
        )  # fmt: skip


if __name__ == "__main__":
    main()
