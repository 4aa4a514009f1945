"""``cheapnet-serve`` / ``python -m cheapnet_jax.serve``: the inspection service.

    cheapnet-serve --checkpoint runs/demo --warm 512x512 --port 8000

Binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM (or Ctrl-C) stops taking new
connections, answers the requests already in, then exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cheapnet_jax import cli
from cheapnet_jax.errors import SettingsError


def warm_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``512x512,256`` -> ((512, 512), (256, 256)); ``none`` for no warm-up."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(cli.image_shape(part.strip()) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    from cheapnet_jax.detection import INFERENCE_DTYPES
    from cheapnet_jax.inspection import DEFAULT_MIN_AREA, DEFAULT_THRESHOLD, InspectorOptions
    from cheapnet_jax.serve.app import ServiceOptions

    parser = cli.parser(
        "cheapnet-serve",
        "Serve a CheapNet detector over HTTP: POST /v1/inspect, GET /v1/model, /healthz, "
        "/readyz, /metrics, and a page at /.",
    )
    add = parser.add_argument
    served = parser.add_mutually_exclusive_group(required=True)
    served.add_argument(
        "--checkpoint",
        help="an authors' .pkl, a training workdir, or a population workdir (every member, "
        "named as in its population.json)",
    )
    served.add_argument(
        "--model",
        dest="models",
        action="append",
        type=cli.named_path,
        metavar="NAME=PATH",
        help="serve this checkpoint (a .pkl or a run folder) as model NAME; repeat for more "
        "(POST /v1/models/NAME/inspect)",
    )
    add("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    add("--port", type=int, default=8000, help="port to bind")
    cli.add_calibrated_settings(add, DEFAULT_THRESHOLD, DEFAULT_MIN_AREA)
    add(
        "--normalization",
        type=cli.normalization,
        help="mean,std of pixel/255 (none: the checkpoint's own, else the authors')",
    )
    add(
        "--max-batch",
        dest="batch_size",
        type=cli.count,
        default=InspectorOptions.batch_size,
        help="images per call",
    )
    add(
        "--max-wait-ms",
        type=cli.finite,
        default=ServiceOptions.max_wait_ms,
        help="how long the first image of a batch waits for others (at most: see --early-dispatch)",
    )
    add(
        "--early-dispatch",
        action=argparse.BooleanOptionalAction,
        default=ServiceOptions.early_dispatch,
        help="when a device is free and no other request is being received or decoded, send "
        "the waiting images at once rather than wait out --max-wait-ms (the requests that came "
        "together still share a batch)",
    )
    add(
        "--max-queue",
        type=cli.count,
        default=ServiceOptions.max_queue,
        help="images waiting at most; beyond, 503 with Retry-After",
    )
    add(
        "--warm",
        type=warm_sizes,
        default=ServiceOptions.warm,
        help="image sizes (N or HxW, comma-separated, or none) compiled before /readyz is "
        "ready (default 512x512)",
    )
    add(
        "--max-image-pixels",
        type=cli.count,
        default=ServiceOptions.max_image_pixels,
        help="refuse larger images (413)",
    )
    add(
        "--max-body-bytes",
        type=cli.count,
        default=ServiceOptions.max_body_bytes,
        help="refuse larger bodies (413), before reading them",
    )
    add(
        "--tile-above",
        type=cli.non_negative,
        default=InspectorOptions.tile_above,
        help="images of more pixels go through exact tiles",
    )
    add("--max-components", type=cli.count, default=InspectorOptions.max_components)
    add("--dtype", choices=sorted(INFERENCE_DTYPES), default="float32", help="activations")
    add("--impl", choices=["auto", "lax", "fused"], default="auto", help="layer implementation")
    add("--token-file", help="a file holding the bearer token every request must carry")
    add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise SettingsError(f"--token-file {path}: empty")
    return token


def _main(argv: list[str]) -> int:
    import uvicorn

    from cheapnet_jax.serve.app import ServiceOptions, create_app
    from cheapnet_jax.serve.protocol import BoundedHeadProtocol

    args = build_parser().parse_args(argv)
    if args.max_wait_ms < 0:
        raise SettingsError(f"--max-wait-ms {args.max_wait_ms}: must be >= 0")
    token = _read_token(args.token_file)
    inspector = cli.load_inspector(args)
    app = create_app(
        inspector,
        ServiceOptions(
            max_wait_ms=args.max_wait_ms,
            early_dispatch=args.early_dispatch,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            max_image_pixels=args.max_image_pixels,
            warm=args.warm,
            token=token,
            freeze_heap=True,
        ),
    )
    settings = ", ".join(
        f"{name} {inspector.settings[name].value} ({inspector.settings[name].origin})"
        for name in ("threshold", "min_area")
    )
    what = inspector.loaded.source
    if len(inspector.models) > 1:
        what = f"{len(inspector.models)} models ({', '.join(inspector.models)})"
    print(f"serving {what} on http://{args.host}:{args.port} ({settings})", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            http=BoundedHeadProtocol,  # request heads of at most 64 KiB (431 beyond)
        )
    )
    # uvicorn drains on SIGTERM, then raises the signal again with the handler it found: with
    # this one in place that ends the process normally (exit 0) after the drain.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.serve
    sys.exit(main())
