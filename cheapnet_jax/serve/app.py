"""The inspection service's HTTP side (FastAPI): routes, limits, authentication, metrics.

    POST /v1/inspect   one image (raw body or multipart) -> verdict and defects
    GET  /v1/model     what answers: variant, G, normalisation, calibration, checkpoint, digest
    GET  /v1/models    every model served (one per product): name, G, digest, settings
    POST /v1/models/{name}/inspect   /v1/inspect by the model of that name

Serving several models (a population workdir, or ``--model NAME=PATH`` repeated), requests
for different models wait in one queue and models of one width share device calls (each image
answered by its own model: `Inspector.of_models`); ``/v1/inspect`` and ``/v1/model`` then
ask which model (400), and an unknown name is a 404 naming the served ones.
    GET  /healthz      the process is up (open without a token)
    GET  /readyz       the model is loaded and compiled for the warm sizes (503 until then)
    GET  /metrics      Prometheus text
    GET  /             a page for a person at the line (open; it asks for the token if needed)

Every error is ``{"error": "<what was wrong>"}`` with a 4xx status (5xx only for the server's
own failures); the next request is served as if nothing happened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cheapnet_jax.calibration import read_calibration
from cheapnet_jax.checkpoints import calibration_path
from cheapnet_jax.data import DataError, ImageModeError, ImageTooLargeError, decode_image
from cheapnet_jax.inspection import Inspector, Result, variant_name
from cheapnet_jax.prediction import render_overlay
from cheapnet_jax.serve.batching import DynamicBatcher, QueueFullError

API_VERSION = "v1"
RAW_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class ServiceOptions:
    """The service's limits and batching (its flags)."""

    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_body_bytes: int = 64 * 2**20
    max_image_pixels: int = 8192 * 8192
    warm: tuple[tuple[int, int], ...] = ((512, 512),)
    token: str | None = None  # bearer token; None: no authentication
    early_dispatch: bool = True  # see DynamicBatcher: no waiting when no request is on its way
    retry_after_s: int = 1
    # After the warm-up, collect once and freeze what is left (`gc.freeze`): the imports, the
    # model and the compiled programs (about 450,000 objects) are then never traversed again
    # by Python's full collections, each of which otherwise stopped the whole process for
    # 80-155 ms now and then under load (the p99 latency). A process-wide setting: the
    # command line turns it on; an app made inside another program leaves it off.
    freeze_heap: bool = False


class ApiError(Exception):
    """A request the service refuses: its status and the one line saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Metrics:
    """The service's Prometheus metrics, on a registry of its own (one per app)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cheapnet_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cheapnet_inspect_latency_seconds",
            "an inspection: from the request's arrival to its answer, by model",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.inspections = Counter(
            "cheapnet_inspections",
            "images answered, by model and verdict",
            ["model", "verdict"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cheapnet_batch_size",
            "images per device call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cheapnet_queue_depth", "images waiting for a batch", registry=self.registry
        )
        self.in_flight = Gauge(
            "cheapnet_images_in_flight", "images in a device call", registry=self.registry
        )


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is refused (413) from its Content-Length
    before it is read, or as soon as the bytes received pass the limit (chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = _error(413, f"body of {int(declared):,} bytes: at most {self.limit:,}")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, f"body over {self.limit:,} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class _CountRequests:
    """ASGI middleware: count each answer by route and status. (Pure ASGI: Starlette's
    BaseHTTPMiddleware would hide a client's disconnection from the routes.)"""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.counter.labels(path, str(status[0]) if status else "none").inc()


def _media_type(content_type: str) -> str:
    """A Content-Type's media type: ``image/png; x=1`` -> ``image/png``."""
    return content_type.split(";")[0].strip().lower()


def _carries_token(authorization: str, token: bytes) -> bool:
    """Whether an Authorization header's value is ``Bearer <token>`` (constant-time compare)."""
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), token)


INSPECT_PATH = f"/{API_VERSION}/inspect"
MODELS_PATH = f"/{API_VERSION}/models"
MODEL_INSPECT_PATH = MODELS_PATH + "/{name}/inspect"


class _DefaultInspect:
    """ASGI middleware, the hot path of a line: ``POST /v1/inspect`` (one model served) or
    ``POST /v1/models/{name}/inspect`` (a served model's name) with a raw image body of a
    declared length within the limit, no query (the default settings, no overlay) and, when a
    token is set, the right one, is answered here by the route's own `inspect_image`, without
    FastAPI's routing, dependencies and middleware: CheapNet-S on 2 CPU cores served a median
    0.84 of the in-process detector's rate against 0.79 without it (BENCHMARKS.md). Every other
    request, refusals included, goes on to the app and its route."""

    def __init__(
        self,
        app,
        inspect_image,
        token: bytes | None,
        max_body_bytes: int,
        counter,
        models: list[str],
    ):
        self.app, self.inspect_image, self.token = app, inspect_image, token
        self.max_body_bytes, self.counter = max_body_bytes, counter
        # the paths answered here, each with its model (None: /v1/inspect's only model)
        self.paths = {MODEL_INSPECT_PATH.format(name=name): name for name in models}
        if len(models) == 1:
            self.paths[INSPECT_PATH] = None

    def _serves(self, scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        if scope["path"] not in self.paths or scope.get("query_string"):
            return False
        # ASGI header values are bytes, read as latin-1 (as Starlette reads them for the route).
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers") or []}
        length = headers.get(b"content-length", "")
        if not _media_type(headers.get(b"content-type", "")).startswith(RAW_TYPES):
            return False
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return False
        return self.token is None or _carries_token(headers.get(b"authorization", ""), self.token)

    async def __call__(self, scope, receive, send):
        if not self._serves(scope):
            return await self.app(scope, receive, send)

        async def read_payload() -> tuple[bytes, str]:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            return b"".join(chunks), "request body"

        async def unless_gone(work: asyncio.Future):
            # Once the body is read, the next message is the client's going away.
            gone = asyncio.ensure_future(receive())
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    return work.result()
                return None
            finally:
                gone.cancel()
                if not work.done():  # gone, or this request cancelled: its image leaves the queue
                    work.cancel()

        status = "none"
        model = self.paths[scope["path"]]
        try:
            try:
                response = await self.inspect_image(
                    read_payload, None, None, False, unless_gone, model
                )
            except ApiError as err:
                response = _error(err.status, err.message, err.headers)
            except ClientDisconnect:
                response = Response(status_code=CLIENT_GONE)
            status = str(response.status_code)
            await response(scope, receive, send)
        finally:
            route = INSPECT_PATH if model is None else MODEL_INSPECT_PATH
            self.counter.labels(route, status).inc()


async def _read_image_bytes(request: Request) -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for messages: a raw body (``image/*`` or
    ``application/octet-stream``) or the first file of a multipart form."""
    content_type = _media_type(request.headers.get("content-type", ""))
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except ApiError:
            raise
        except Exception as err:  # python-multipart's and starlette's parse errors
            raise ApiError(400, f"multipart body: cannot parse ({err})") from err
        files = [value for value in form.values() if hasattr(value, "read")]
        if not files:
            raise ApiError(400, "multipart body: no file part (send the image as a file)")
        upload = files[0]
        return await upload.read(), f"uploaded file {upload.filename!r}"
    if not content_type.startswith(RAW_TYPES):
        raise ApiError(
            415,
            f"Content-Type {content_type or 'missing'!r}: send the image as image/png (or "
            "another image/* type), application/octet-stream or multipart/form-data",
        )
    return await request.body(), "request body"


def _decode(payload: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, str | None]:
    if not payload:
        raise ApiError(400, f"{name}: empty: no image was sent")
    try:
        return decode_image(
            io.BytesIO(payload), name, convert_to_grayscale=True, max_pixels=max_pixels
        )
    except ImageTooLargeError as err:
        raise ApiError(413, str(err)) from err
    except ImageModeError as err:  # decoded, but a pixel format the model does not take
        raise ApiError(422, str(err)) from err
    except DataError as err:
        raise ApiError(400, str(err)) from err


def model_description(inspector: Inspector) -> dict:
    """``GET /v1/model``: what answers the requests (a single-model inspector, or one of
    `Inspector.models`)."""
    loaded = inspector.loaded
    features = loaded.model.features
    calibration_file = (
        calibration_path(inspector.checkpoint) if inspector.checkpoint is not None else None
    )
    return {
        "variant": variant_name(features),
        "features": features,
        "parameters": 137 * features + 3,
        "checkpoint": loaded.source,
        "checkpoint_path": str(inspector.checkpoint),
        "weights_digest": inspector.digest,
        "normalization": {
            "mean": inspector.normalization.mean,
            "std": inspector.normalization.std,
        },
        "calibration": read_calibration(calibration_file) if calibration_file else None,
        "calibration_file": (
            str(calibration_file) if calibration_file and calibration_file.is_file() else None
        ),
        "name": inspector.name,
        "defaults": _default_settings(inspector),
        "dtype": inspector.options.dtype,
        "max_batch": inspector.options.batch_size,
        "max_components": inspector.options.max_components,
        "devices": [str(device) for device in inspector.devices],
        # on the host, overlapped with the next batch's network (Inspector.start_batch)
        "labels_on_host": inspector.labels_on_host,
    }


def create_app(inspector: Inspector, options: ServiceOptions = ServiceOptions()) -> FastAPI:
    """The service of ``inspector``'s model (run it with uvicorn)."""
    metrics = _Metrics()
    served = inspector.models
    several = len(served) > 1
    # what a request without settings gets, by model
    default_settings = {name: _default_settings(model) for name, model in served.items()}
    state = {"ready": False, "warmed": [], "warm_error": None, "frozen_objects": None}
    batcher_box: dict[str, DynamicBatcher] = {}

    def run_batch(worker: int, key, items) -> Callable[[], list[Result]]:
        """The batch's device part; returns its host part (`Inspector.start_batch`). The key:
        (shape, width, threshold, min_area, tiled), a threshold or minimum area None where
        each image's model gives its own; the items: (image, overlay, model)."""
        _, _, threshold, min_area, tiled = key
        keep = any(overlay for _, overlay, _ in items)
        if tiled:  # one image at a time, in tiles
            found = [
                inspector.inspect_tiled(worker, image, threshold, min_area, keep, model=model)
                for image, _, model in items
            ]
            return lambda: found
        images = [image for image, _, _ in items]
        models = [model for _, _, model in items]
        return inspector.start_batch(worker, images, threshold, min_area, keep, models=models)

    async def warm_up() -> None:
        try:
            for shape in options.warm:
                await asyncio.to_thread(inspector.warm, shape)
                state["warmed"].append(f"{shape[0]}x{shape[1]}")
            if options.freeze_heap:
                gc.collect()
                gc.freeze()
                state["frozen_objects"] = gc.get_freeze_count()
            state["ready"] = True
        except Exception as err:  # reported by /readyz; the service keeps answering
            state["warm_error"] = f"{type(err).__name__}: {err}"
            raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = DynamicBatcher(
            run_batch,
            workers=len(inspector.devices),
            max_batch=inspector.options.batch_size,
            max_wait_s=options.max_wait_ms / 1000,
            max_queue=options.max_queue,
            on_batch=metrics.batch_size.observe,
            on_queue=metrics.queue_depth.set,
            on_in_flight=metrics.in_flight.set,
            early_dispatch=options.early_dispatch,
            finish_batch=lambda worker, key, finish: finish(),
        )
        batcher.start()
        batcher_box["batcher"] = batcher
        warming = asyncio.get_running_loop().create_task(warm_up())
        try:
            yield
        finally:
            # uvicorn has drained the open requests; serve what is left, then stop.
            await batcher.close()
            warming.cancel()

    app = FastAPI(
        title="cheapnet-serve",
        summary="CheapNet defect inspection: one image in, the verdict and its defects out.",
        version=API_VERSION,
        lifespan=lifespan,
    )
    app.add_middleware(_BodyLimit, limit=options.max_body_bytes)
    token = options.token.encode() if options.token else None

    async def authorized(request: Request) -> None:
        if token is None:
            return
        if not _carries_token(request.headers.get("authorization", ""), token):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in err.errors()
        ]
        return _error(422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Loaded and compiled for the warm sizes", dependencies=auth)
    async def readyz() -> JSONResponse:
        body = {
            "ready": state["ready"],
            "warm": [f"{h}x{w}" for h, w in options.warm],
            "compiled": state["warmed"],
            "frozen_objects": state["frozen_objects"],
        }
        if state["warm_error"]:
            body["error"] = state["warm_error"]
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=auth)
    async def prometheus_metrics() -> Response:
        batcher = batcher_box.get("batcher")
        if batcher is not None:
            metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(f"/{API_VERSION}/model", summary="The model that answers", dependencies=auth)
    async def model() -> dict:
        return model_description(served[_served_model(served, None)])

    @app.get(MODELS_PATH, summary="Every model served", dependencies=auth)
    async def models() -> list[dict]:
        return [model_description(model) for model in served.values()]

    async def inspect_image(
        read_payload: Callable[[], Awaitable[tuple[bytes, str]]],
        threshold: float | None,
        min_area: int | None,
        overlay: bool,
        unless_gone: Callable[[asyncio.Future], Awaitable],
        model: str | None = None,
    ) -> Response:
        """One image's answer by ``model`` (None: the only one): the routes' and the default
        fast path's (`_DefaultInspect`)."""
        arrived = time.monotonic()
        model_name = _served_model(served, model)
        answering = served[model_name]
        batcher = batcher_box["batcher"]
        batcher.expect()  # on its way: a free worker waits for it rather than leave without it
        try:  # everything up to `submit`, which takes the announcement over
            payload, name = await read_payload()
            image, warning = await asyncio.to_thread(
                _decode, payload, name, options.max_image_pixels
            )
            decoded = time.monotonic()
            given = {"threshold": threshold, "min_area": min_area}
            settings = {
                setting: {"value": value, "source": "request"}
                if value is not None
                else default_settings[model_name][setting]
                for setting, value in given.items()
            }
            # Several models: a setting not given is each image's model's own (None), so that
            # images for different models of one width share a batch.
            key = (
                image.shape,
                inspector.width_of(model_name),
                float(settings["threshold"]["value"])
                if threshold is not None or not several
                else None,
                int(settings["min_area"]["value"]) if min_area is not None or not several else None,
                inspector.tiled(image.shape),
            )
        except BaseException:
            batcher.unexpect()
            raise
        try:
            submission = batcher.submit(key, (image, overlay, model_name), expected=True)
            answered = await unless_gone(submission)
        except QueueFullError as err:
            raise ApiError(
                503, f"busy: {err}", {"Retry-After": str(options.retry_after_s)}
            ) from err
        if answered is None:
            return Response(status_code=CLIENT_GONE)
        found, batch = answered
        answer = {
            "verdict": "NG" if found.defects else "OK",
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "defects": [defect.as_dict() for defect in found.defects],
            "components_left_out": found.components_left_out,
            "warning": warning,
            "settings": {
                **settings,
                "normalization": {
                    "mean": answering.normalization.mean,
                    "std": answering.normalization.std,
                },
            },
            "model": {
                "name": model_name,
                "variant": variant_name(answering.loaded.model.features),
                "features": answering.loaded.model.features,
                "weights_digest": answering.digest,
            },
            "batch_size": batch.size,
        }
        if found.tiles is not None:
            answer["tiles"] = found.tiles
        if overlay:
            if found.mask is None:
                answer["overlay_png"] = None
            else:
                png = await asyncio.to_thread(render_overlay, image, found.mask, found.defects)
                answer["overlay_png"] = base64.b64encode(png).decode()
        answer["timing_ms"] = {
            "decode": round(1000 * (decoded - arrived), 3),
            "queue": round(1000 * batch.queued_s, 3),
            "compute": round(1000 * batch.compute_s, 3),
            "total": round(1000 * (time.monotonic() - arrived), 3),
        }
        metrics.latency.labels(model_name).observe(time.monotonic() - arrived)
        metrics.inspections.labels(model_name, answer["verdict"]).inc()
        return JSONResponse(answer)

    async def inspect_request(
        request: Request,
        threshold: float | None,
        min_area: int | None,
        overlay: bool,
        model: str | None,
    ) -> Response:
        """The inspection routes' answer (`inspect_image` of the request's upload)."""
        return await inspect_image(
            lambda: _read_image_bytes(request),
            threshold,
            min_area,
            overlay,
            lambda work: _unless_disconnected(request, work),
            model,
        )

    @app.post(
        MODEL_INSPECT_PATH,
        summary="Inspect one image with a model of the service",
        description="As POST /v1/inspect, answered by the served model ``name`` (GET "
        "/v1/models lists them); an unknown name is a 404 naming the served ones.",
        dependencies=auth,
    )
    async def inspect_by_model(
        name: str,
        request: Request,
        threshold: ThresholdQuery = None,
        min_area: MinAreaQuery = None,
        overlay: OverlayQuery = False,
    ) -> Response:
        return await inspect_request(request, threshold, min_area, overlay, name)

    @app.post(
        f"/{API_VERSION}/inspect",
        summary="Inspect one image",
        description="The image as the raw body (image/png, image/bmp, image/tiff, image/jpeg or "
        "application/octet-stream) or as the file of a multipart form. Answers the verdict "
        "(NG when any defect), the defects (box [x1, y1, x2, y2] inclusive, area in pixels, "
        "score = mean probability), the settings used and where each came from, the model and "
        "the time spent; with overlay=true also a PNG overlay, base64.",
        dependencies=auth,
    )
    async def inspect(
        request: Request,
        threshold: ThresholdQuery = None,
        min_area: MinAreaQuery = None,
        overlay: OverlayQuery = False,
    ) -> Response:
        return await inspect_request(request, threshold, min_area, overlay, None)

    # Each middleware added wraps those added before it: added last, this one sees a request
    # first, and the requests it serves skip the routing, the dependencies and the others.
    app.add_middleware(
        _DefaultInspect,
        inspect_image=inspect_image,
        token=token,
        max_body_bytes=options.max_body_bytes,
        counter=metrics.requests,
        models=list(served),
    )

    page = resources.files("cheapnet_jax.serve").joinpath("static/index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page.replace("{{API_VERSION}}", json.dumps(API_VERSION)))

    return app


ThresholdQuery = Annotated[
    float | None, Query(gt=0, lt=1, description="default: the model's calibration, else 0.5")
]
MinAreaQuery = Annotated[
    int | None, Query(ge=0, description="default: the model's calibration, else 0")
]
OverlayQuery = Annotated[bool, Query(description="return a PNG overlay (base64)")]
"""The inspection routes' query parameters."""


def _served_model(served: dict[str, Inspector], name: str | None) -> str:
    """``name`` if it is served; None: the only model. ApiError naming the served models: 404
    for an unknown name, 400 where several are served and none was named."""
    if name is None:
        if len(served) == 1:
            return next(iter(served))
        raise ApiError(
            400,
            f"{len(served)} models are served ({', '.join(served)}): name one, "
            f"POST {MODEL_INSPECT_PATH} (GET {MODELS_PATH} describes them)",
        )
    if name not in served:
        raise ApiError(404, f"no model {name!r} is served; the models: {', '.join(served)}")
    return name


def _default_settings(inspector: Inspector) -> dict[str, dict]:
    """The service's default settings and where each came from: the service's flag, the
    checkpoint's calibration (its file) or the default."""
    sources = {
        "given": "service flag",
        "calibration": f"calibration {calibration_path(inspector.checkpoint)}",
    }
    return {
        name: {"value": setting.value, "source": sources.get(setting.origin, setting.origin)}
        for name, setting in inspector.settings.items()
        if name != "normalization"
    }


CLIENT_GONE = 499
"""The status logged for a request whose client went away before its answer (nginx's)."""


async def _unless_disconnected(request: Request, work):
    """Await ``work``; if the client goes away first, cancel it (its image leaves the queue)
    and return None."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
