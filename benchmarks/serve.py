"""The inspection service under a bounded load on 127.0.0.1, against the in-process detector.

    .venv/bin/python benchmarks/serve.py [--features 2,32] [--clients 16,64] [--duration 60] \
        [--max-batch 8] [--formats png,tiff] [--json out/serve.json]

For each width G it starts ``cheapnet-serve`` (a new process, the authors' checkpoint from ../shared
when present, else random weights) and, for each client count, keeps that many clients posting the
10 real 512x512 samples (else synthetic images of that size) for ``--duration`` seconds, each client
waiting for its answer before the next request. Every answer is compared with the in-process
detector's for its image (boxes and areas equal, scores within 1e-5): a lost or wrong answer is
counted. Reported: answers/s, p50/p95/p99 latency, errors, the server's resident memory after
warm-up and at the end, the CPU time the server and the load generator spent per answer, and the
in-process detector's images/s at the same batch size (`Inspector.inspect_batch`, batches of
--max-batch) for the ratio: on decoded images, back to back for up to 10 s right before and right
after each load run (``ratio``, against the mean of the two, both shown), and on the posted files
decoded as the service decodes them (``ratio_decoding``, per format: the service must decode every
request).
``--formats`` names the encodings the clients post: the samples as they are (``png``), or re-encoded
losslessly as uncompressed TIFF (``tiff``: a camera's raw frame, 0.15 ms of CPU to decode against
2.6-2.9 ms for these PNGs), one row per format. ``p99_goal_ms`` is twice the in-process time of a
batch of min(clients, --max-batch) images plus --max-wait-ms. Requests stop at the deadline; the
server is stopped with SIGTERM. The load generator shares the machine's cores with the server:
``--client raw`` (default) posts prepared requests on keep-alive connections with asyncio streams,
``--client httpx`` uses httpx (several times the CPU per request).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cheapnet_jax.bench import (  # noqa: E402
    format_table,
    machine_description,
    time_call,
    write_json,
)
from cheapnet_jax.data import decode_image  # noqa: E402
from cheapnet_jax.inspection import (  # noqa: E402
    Inspector,
    compiled_batch_size,
    compiled_batch_sizes,
)

SHARED = ROOT.parent / "shared"
SAMPLES = SHARED / "dagm-samples" / "Class6" / "Train"


def checkpoint(features: int, folder: Path) -> Path:
    path = SHARED / "torch-checkpoints" / f"CheapNet_G{features}.pkl"
    if path.is_file():
        return path
    import jax

    from cheapnet_jax.model import CheapNet, init_variables
    from cheapnet_jax.torch_import import save_torch_checkpoint

    path = folder / f"random-G{features}.pkl"
    save_torch_checkpoint(init_variables(CheapNet(features=features), jax.random.key(0)), path)
    return path


FORMATS = {"png": "PNG", "tiff": "TIFF", "bmp": "BMP"}
SUSTAINED_S = 10.0
"""The longest window of the in-process rate taken before and after each load run."""


def images() -> list[bytes]:
    """The 10 real samples as PNG files (else 10 synthetic 512x512 images)."""
    if SAMPLES.is_dir():
        return [p.read_bytes() for p in sorted(SAMPLES.glob("*.PNG"))]
    from cheapnet_jax.synthetic import make_split

    return [
        encoded(np.asarray(p).squeeze(), "png") for p in make_split("validation", 10, 512, 0)[0]
    ]


def encoded(pixels: np.ndarray, image_format: str) -> bytes:
    """8-bit grayscale ``pixels`` [H, W] as a file of ``image_format`` (lossless; uncompressed
    for TIFF and BMP)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, FORMATS[image_format])
    return buffer.getvalue()


def decode(payload: bytes) -> np.ndarray:
    """``payload`` decoded as the service decodes an upload (`decode_image`)."""
    return decode_image(io.BytesIO(payload), "upload", convert_to_grayscale=True)[0]


def in_process_figures(path: Path, payloads: dict[str, list[bytes]], max_batch: int) -> dict:
    """The in-process detector (`Inspector.inspect_batch`): each image's defects, images/s on
    batches of ``max_batch`` decoded images and on the files of each format decoded as the
    service decodes them (`decode`), and the seconds of a batch of each compiled size."""
    inspector, one_program = (
        Inspector.load(path, calibration=False, batch_size=max_batch, labels_on_host=on_host)
        for on_host in (None, False)  # the service's default form, the one program
    )

    pixels = [decode(p) for p in payloads["png"]]
    expected = [
        [d.as_dict() for d in inspector.inspect_batch(0, [image], 0.5, 0)[0].defects]
        for image in pixels
    ]
    batch_seconds = {}
    for size in compiled_batch_sizes(max_batch):
        batch = (pixels * size)[:size]
        timing = time_call(lambda b=batch: inspector.inspect_batch(0, b, 0.5, 0))
        batch_seconds[size] = timing.median_s
    decoding_img_s = {}
    for image_format, files in payloads.items():
        batch_files = (files * max_batch)[:max_batch]
        with_decoding = time_call(
            lambda fs=batch_files: inspector.inspect_batch(0, [decode(f) for f in fs], 0.5, 0)
        ).median_s
        decoding_img_s[image_format] = max_batch / with_decoding
    full_batch = (pixels * max_batch)[:max_batch]
    return {
        "expected": expected,
        "decoding_img_s": decoding_img_s,
        "batch_seconds": batch_seconds,
        # The two forms of the in-process detector (the service's, predict.py's), each for
        # half the window: the ratio is taken against the faster.
        "sustained": lambda seconds: {
            form: sustained_img_s(
                lambda i=inspecting: i.inspect_batch(0, full_batch, 0.5, 0), max_batch, seconds / 2
            )
            for form, inspecting in (
                (("two parts", inspector),) if inspector.labels_on_host else ()
            )
            + (("one program", one_program),)
        },
    }


def sustained_img_s(inspect: Callable[[], object], batch: int, seconds: float) -> float:
    """Images/s of back-to-back ``inspect()`` calls (``batch`` images each) over ``seconds``:
    the in-process rate over a window like the load's, taken right before and right after
    each load run, so that this VM's drifting speed (10-20% within minutes) moves both sides
    of the ratio alike."""
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        inspect()
        calls += 1
    return calls * batch / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def same(answer: list, expected: list) -> bool:
    if [(d["box"], d["area"]) for d in answer] != [(d["box"], d["area"]) for d in expected]:
        return False
    return all(abs(a["score"] - e["score"]) <= 1e-5 for a, e in zip(answer, expected, strict=True))


class RawConnection:
    """One keep-alive HTTP/1.1 connection that posts prepared requests: a load generator that
    takes little of the CPU it shares with the server (``--client raw``, the default; the
    table's client CPU column shows what httpx takes)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise ConnectionError("the connection broke") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def inspect_request(host: str, port: int, payload: bytes, image_format: str) -> bytes:
    head = (
        f"POST /v1/inspect HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: image/{image_format}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def load(
    url: str,
    payloads: list[bytes],
    image_format: str,
    expected: list,
    clients: int,
    duration: float,
    client_kind: str = "raw",
) -> dict:
    latencies, wrong, errors = [], 0, 0
    deadline = time.monotonic() + duration
    host, port = url.removeprefix("http://").split(":")
    requests = [inspect_request(host, int(port), payload, image_format) for payload in payloads]

    async def client(index: int, http: httpx.AsyncClient | None) -> None:
        nonlocal wrong, errors
        connection = RawConnection(host, int(port))
        n = index
        while time.monotonic() < deadline:
            k = n % len(payloads)
            n += 1
            start = time.perf_counter()
            try:
                if http is None:
                    status, body = await connection.post(requests[k])
                else:
                    response = await http.post(
                        f"{url}/v1/inspect",
                        content=payloads[k],
                        headers={"content-type": f"image/{image_format}"},
                    )
                    status, body = response.status_code, response.content
            except (ConnectionError, httpx.HTTPError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors += 1
            elif not same(json.loads(body)["defects"], expected[k]):
                wrong += 1
        connection.close()

    started = time.monotonic()
    if client_kind == "raw":
        await asyncio.gather(*(client(i, None) for i in range(clients)))
    else:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.monotonic() - started
    q = np.quantile(latencies, [0.5, 0.95, 0.99]) * 1000 if latencies else [np.nan] * 3
    return {
        "answers": len(latencies),
        "answers_per_s": len(latencies) / elapsed,
        "p50_ms": q[0],
        "p95_ms": q[1],
        "p99_ms": q[2],
        "errors": errors,
        "wrong": wrong,
    }


def run(
    features: int,
    clients_list,
    duration,
    max_batch,
    max_wait_ms,
    folder,
    client_kind,
    early_dispatch,
    image_formats,
) -> list[dict]:
    path = checkpoint(features, folder)
    pngs = images()
    # The PNG files too where they are not posted: the expected answers come from them.
    payloads = {"png": pngs} | {
        f: [encoded(decode(p), f) for p in pngs] for f in image_formats if f != "png"
    }
    in_process = in_process_figures(path, payloads, max_batch)
    expected = in_process["expected"]
    port = 8700 + features % 97
    command = [
        sys.executable, "-m", "cheapnet_jax.serve", "--checkpoint", str(path),
        "--port", str(port), "--warm", "512", "--max-batch", str(max_batch),
        "--max-wait-ms", str(max_wait_ms), "--max-queue", "256", "--log-level", "warning",
        "--no-calibration", "--early-dispatch" if early_dispatch else "--no-early-dispatch",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        # warm the connections and caches
        first = image_formats[0]
        asyncio.run(load(url, payloads[first], first, expected, 4, 5, client_kind))
        for image_format, clients in itertools.product(image_formats, clients_list):
            full = compiled_batch_size(min(clients, max_batch), max_batch)
            window = min(duration, SUSTAINED_S)
            before = in_process["sustained"](window)
            start_mib = resident_mib(server.pid)
            server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
            figures = asyncio.run(
                load(
                    url,
                    payloads[image_format],
                    image_format,
                    expected,
                    clients,
                    duration,
                    client_kind,
                )
            )
            end_mib = resident_mib(server.pid)
            answers = max(figures["answers"], 1)
            figures["server_cpu_ms_per_answer"] = (
                1000 * (cpu_seconds(server.pid) - server_cpu) / answers
            )
            figures["client_cpu_ms_per_answer"] = (
                1000 * (time.process_time() - client_cpu) / answers
            )
            after = in_process["sustained"](window)
            by_form = {form: (before[form] + after[form]) / 2 for form in before}
            fastest = max(by_form, key=by_form.get)
            before_img_s, after_img_s = before[fastest], after[fastest]
            in_process_img_s = by_form[fastest]
            rows.append(
                {
                    "G": features,
                    "format": image_format,
                    "clients": clients,
                    **figures,
                    "in_process_img_s": in_process_img_s,
                    "in_process_before_after": f"{before_img_s:.1f}/{after_img_s:.1f}",
                    "in_process_form": fastest,
                    "in_process_other_img_s": min(by_form.values()),
                    "ratio": figures["answers_per_s"] / in_process_img_s,
                    "in_process_decoding_img_s": in_process["decoding_img_s"][image_format],
                    "ratio_decoding": figures["answers_per_s"]
                    / in_process["decoding_img_s"][image_format],
                    # the goal at this load: p99 under 2x the compute of a batch of
                    # min(clients, max_batch) images plus --max-wait-ms
                    "p99_goal_ms": 2000 * in_process["batch_seconds"][full] + max_wait_ms,
                    "rss_start_mib": start_mib,
                    "rss_end_mib": end_mib,
                }
            )
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="2,32")
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="the load generator: prepared requests on raw keep-alive connections, or httpx",
    )
    parser.add_argument(
        "--early-dispatch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the service's --early-dispatch",
    )
    parser.add_argument(
        "--formats",
        default="png",
        help="comma-separated encodings the clients post: png (the samples' files), tiff, bmp",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    image_formats = args.formats.split(",")
    if unknown := set(image_formats) - set(FORMATS):
        parser.error(
            f"--formats: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}"
        )
    folder = Path("out")
    folder.mkdir(exist_ok=True)
    rows = []
    for features in [int(g) for g in args.features.split(",")]:
        clients = [int(c) for c in args.clients.split(",")]
        rows += run(
            features,
            clients,
            args.duration,
            args.max_batch,
            args.max_wait_ms,
            folder,
            args.client,
            args.early_dispatch,
            image_formats,
        )
    print(machine_description())
    print(format_table(rows, list(rows[0])))
    if args.json:
        write_json(args.json, rows, command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
