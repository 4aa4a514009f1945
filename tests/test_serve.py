"""The inspection service: dynamic batching (a fake device, known answers), the API against
predict.py's own answers on the real samples, bad input, authentication, backpressure, metrics,
and the command line as a line runs it (a new process on 127.0.0.1: readiness, a client that
gives up, SIGTERM with requests in flight) and the page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, SAMPLES, checkpoint_path, cli_env, free_port
from PIL import Image
from scipy import ndimage

pytest.importorskip("fastapi", reason="the service needs the 'serve' extra")
httpx = pytest.importorskip("httpx", reason="the service's tests need httpx")

from cheapnet_jax.checkpoints import calibration_path  # noqa: E402
from cheapnet_jax.detection import LABELS_ON_HOST_UP_TO  # noqa: E402
from cheapnet_jax.inspection import Inspector  # noqa: E402
from cheapnet_jax.labeling import opencv_available  # noqa: E402
from cheapnet_jax.model import CheapNet, init_variables  # noqa: E402
from cheapnet_jax.prediction import PredictOptions, predict_files, read_records  # noqa: E402
from cheapnet_jax.serve import app as app_module  # noqa: E402
from cheapnet_jax.serve.app import ServiceOptions, create_app  # noqa: E402
from cheapnet_jax.serve.batching import DynamicBatcher, QueueFullError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Dynamic batching, with a fake device that records what it was given.


class FakeDevice:
    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[object, list]] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, worker, key, items):
        self.release.wait(10)
        time.sleep(self.delay)
        self.calls.append((key, list(items)))
        return [f"{key}:{item}" for item in items]


def test_concurrent_requests_share_batches_of_one_key_up_to_max_batch():
    device = FakeDevice()

    async def scenario():
        device.release.clear()  # the first batch holds the only worker while the rest gather
        batcher = DynamicBatcher(device, workers=1, max_batch=4, max_wait_s=0.05)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", 0))
        await asyncio.sleep(0.2)
        rest = [asyncio.ensure_future(batcher.submit("a", i)) for i in range(1, 7)]
        rest.append(asyncio.ensure_future(batcher.submit("b", 9)))
        await asyncio.sleep(0.05)
        device.release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [r for r, _ in results] == [f"a:{i}" for i in range(7)] + ["b:9"]
    batches = [(key, items) for key, items in device.calls]
    assert batches[0] == ("a", [0])
    assert ("a", [1, 2, 3, 4]) in batches and ("a", [5, 6]) in batches and ("b", [9]) in batches
    sizes = {r: info.size for r, info in results}
    assert sizes["a:1"] == 4 and sizes["a:6"] == 2 and sizes["b:9"] == 1


def test_a_lone_request_waits_at_most_max_wait():
    device = FakeDevice()

    async def scenario():
        batcher = DynamicBatcher(device, workers=1, max_batch=8, max_wait_s=0.1)
        batcher.start()
        started = time.monotonic()
        result, info = await batcher.submit("a", 1)
        waited = time.monotonic() - started
        await batcher.close()
        return result, info, waited

    result, info, waited = asyncio.run(scenario())
    assert result == "a:1" and info.size == 1
    assert info.queued_s >= 0.09 and waited < 2


def test_early_dispatch_sends_what_came_together_once_nothing_more_is_on_its_way():
    """With early_dispatch a free worker waits (up to max_wait, here 10 s) only for requests
    announced with expect(): three that arrived together leave as one batch when the third is
    submitted; one whose decoding failed (unexpect) is not waited for; a lone request leaves
    at once."""
    device = FakeDevice()

    async def scenario():
        batcher = DynamicBatcher(
            device, workers=1, max_batch=8, max_wait_s=10.0, early_dispatch=True
        )
        batcher.start()
        started = time.monotonic()
        for _ in range(3):
            batcher.expect()
        together = [asyncio.ensure_future(batcher.submit("a", i, expected=True)) for i in (0, 1)]
        await asyncio.sleep(0.2)
        assert device.calls == []  # the third is on its way
        together.append(asyncio.ensure_future(batcher.submit("a", 2, expected=True)))
        first = await asyncio.gather(*together)
        batcher.expect()
        batcher.expect()
        refused_one = asyncio.ensure_future(batcher.submit("b", 3, expected=True))
        await asyncio.sleep(0.2)
        assert len(device.calls) == 1  # still waiting for the second
        batcher.unexpect()  # its image could not be decoded
        second = await refused_one
        lone = await batcher.submit("c", 4)
        await batcher.close()
        return first, second, lone, time.monotonic() - started

    first, second, lone, elapsed = asyncio.run(scenario())
    assert [(key, items) for key, items in device.calls] == [
        ("a", [0, 1, 2]),
        ("b", [3]),
        ("c", [4]),
    ]
    assert [info.size for _, info in first] == [3, 3, 3] and second[1].size == 1
    assert lone[1].queued_s < 1 and elapsed < 5  # nothing waited out the 10 s


def test_an_announced_request_cancelled_at_once_leaves_nothing_to_wait_for():
    """A handler that announced its request (expect), submitted it and was cancelled before it
    ever awaited the answer (a server shutting down) neither leaves its image in the queue nor
    leaves a free worker waiting for it: the next lone request leaves at once, not after the
    10 s max_wait."""
    device = FakeDevice()

    async def scenario():
        batcher = DynamicBatcher(
            device, workers=1, max_batch=8, max_wait_s=10.0, early_dispatch=True
        )
        batcher.start()
        batcher.expect()
        batcher.expect()  # a second request on its way, still being decoded
        handler = asyncio.ensure_future(batcher.submit("a", "gone", expected=True))
        handler.cancel()
        batcher.unexpect()  # the second one's image could not be decoded
        started = time.monotonic()
        lone = await batcher.submit("b", "lone")
        waited = time.monotonic() - started
        await batcher.close()
        return lone, waited, batcher.depth

    lone, waited, depth = asyncio.run(scenario())
    assert lone[0] == "b:lone" and waited < 2 and depth == 0
    assert [items for _, items in device.calls] == [["lone"]]


def test_a_full_queue_refuses_and_a_cancelled_request_leaves_no_work():
    device = FakeDevice()

    async def scenario():
        device.release.clear()
        batcher = DynamicBatcher(device, workers=1, max_batch=1, max_wait_s=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", "running"))
        await asyncio.sleep(0.1)  # dispatched: holds the worker
        waiting = [asyncio.ensure_future(batcher.submit("a", n)) for n in ("x", "gone")]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await batcher.submit("a", "one too many")
        waiting[1].cancel()  # the client gave up
        await asyncio.sleep(0.05)
        assert batcher.depth == 1
        device.release.set()
        served = await asyncio.gather(running, waiting[0])
        await batcher.close()
        return served

    served = asyncio.run(scenario())
    assert [r for r, _ in served] == ["a:running", "a:x"]
    assert [items for _, items in device.calls] == [["running"], ["x"]]


def test_close_serves_everything_submitted():
    device = FakeDevice(delay=0.05)

    async def scenario():
        batcher = DynamicBatcher(device, workers=2, max_batch=2, max_wait_s=1.0)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(i % 3, i)) for i in range(9)]
        await asyncio.sleep(0)
        await batcher.close()  # does not wait max_wait: closing sends every batch now
        return [t.result()[0] for t in tasks]

    assert asyncio.run(scenario()) == [f"{i % 3}:{i}" for i in range(9)]


def test_a_batch_s_host_part_lets_the_worker_take_the_next_batch():
    """With finish_batch, the worker runs the next batch's device part while the host finishes
    the previous one, but takes a third only once the second's host part has begun (one batch
    per worker waits with its device part done); a host part's error reaches its own requests
    only, and each request gets its own batch's results."""
    device = FakeDevice()
    host_may_finish = threading.Event()
    events = []

    def run_batch(worker, key, items):
        events.append(f"device {items[0]}")
        return device(worker, key, items)

    def finish_batch(worker, key, started):
        events.append(f"host {started[0]}")
        host_may_finish.wait(10)
        if started == ["a:bad"]:
            raise ValueError("the host part failed")
        return [f"{result} finished" for result in started]

    async def scenario():
        batcher = DynamicBatcher(
            run_batch, workers=1, max_batch=1, max_wait_s=0, finish_batch=finish_batch
        )
        batcher.start()
        submitted = [asyncio.ensure_future(batcher.submit("a", i)) for i in (0, "bad", 2)]
        await asyncio.sleep(0.3)
        held = list(events)
        host_may_finish.set()
        results = await asyncio.gather(*submitted, return_exceptions=True)
        await batcher.close()
        return held, results

    held, results = asyncio.run(scenario())
    assert held == ["device 0", "host a:0", "device bad"]  # not "device 2" yet
    assert results[0][0] == "a:0 finished" and results[2][0] == "a:2 finished"
    assert isinstance(results[1], ValueError)


# ---------------------------------------------------------------------------------------------
# The API, in process (httpx on the ASGI app, its lifespan run as uvicorn runs it).


def random_checkpoint(folder: Path, seed: int = 0, features: int = 2) -> Path:
    pytest.importorskip("torch", reason="writing a .pkl checkpoint needs torch")
    from cheapnet_jax.torch_import import save_torch_checkpoint

    variables = init_variables(CheapNet(features=features), jax.random.key(seed))
    path = folder / f"random-{seed}.pkl"
    save_torch_checkpoint(variables, path)
    return path


def make_inspector(checkpoint, threshold=None, min_area=None, cls=Inspector, devices=1, **options):
    """The service's inspector of ``checkpoint`` on the first ``devices`` of this process's 8
    simulated CPU devices (each device compiles its own programs)."""
    return cls.load(
        checkpoint,
        threshold=threshold,
        min_area=min_area,
        devices=jax.local_devices()[:devices],
        **options,
    )


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def serve(app, scenario):
    """Run ``scenario(client)`` against ``app`` with its lifespan, as uvicorn would."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for _ in range(600):  # warm-up compiles in the background
                    if (await client.get("/readyz", headers=getattr(app, "auth", {}))).is_success:
                        break
                    await asyncio.sleep(0.1)
                return await scenario(client)

    return asyncio.run(main())


def test_the_service_answers_what_predict_answers_on_the_real_samples(samples_folder, tmp_path):
    # A copy of the authors' G=2 with a calibration beside it: the defaults come from it.
    checkpoint = tmp_path / "CheapNet_G2.pkl"
    shutil.copy(checkpoint_path(2), checkpoint)
    calibration_path(checkpoint).write_text(json.dumps({"threshold": 0.6, "min_area": 3}))
    images = sorted(samples_folder.glob("*.PNG"))
    assert len(images) == 10
    inspector = make_inspector(checkpoint, batch_size=4, devices=2)  # a batch per device
    app = create_app(inspector, ServiceOptions(warm=((512, 512),), max_wait_ms=50))

    async def scenario(client):
        async def post(path, **params):
            headers = {"content-type": "image/png"}
            response = await client.post(
                "/v1/inspect", content=path.read_bytes(), params=params, headers=headers
            )
            assert response.status_code == 200, response.text
            return response.json()

        default = await asyncio.gather(*(post(path) for path in images))
        chosen = await asyncio.gather(*(post(path, threshold=0.8, min_area=40) for path in images))
        return default, chosen

    default, chosen = serve(app, scenario)
    for answers, threshold, min_area in ((default, 0.6, 3), (chosen, 0.8, 40)):
        out = tmp_path / f"predict-{threshold}"
        predicting = Inspector.load(checkpoint, threshold=threshold, min_area=min_area)
        predict_files(predicting, images, out, PredictOptions(progress=False))
        records = {Path(r["file"]).name: r for r in read_records(out)}
        for path, answer in zip(images, answers, strict=True):
            record = records[path.name]
            assert answer["verdict"] == record["verdict"]
            assert [(d["box"], d["area"]) for d in answer["defects"]] == [
                (d["box"], d["area"]) for d in record["defects"]
            ]
            scores = [d["score"] for d in answer["defects"]]
            np.testing.assert_allclose(scores, [d["score"] for d in record["defects"]], atol=2e-6)
    assert default[0]["settings"]["threshold"] == {
        "value": 0.6,
        "source": f"calibration {calibration_path(checkpoint)}",
    }
    assert chosen[0]["settings"]["min_area"] == {"value": 40, "source": "request"}
    assert max(answer["batch_size"] for answer in default + chosen) > 1  # requests shared calls
    assert all(answer["defects"] for answer in default)  # every sample has its defect


def test_the_default_fast_path_answers_as_the_route(random_pkl, monkeypatch):
    """A raw body without a query is answered by `_DefaultInspect` (no routing, no
    dependencies); with ``?overlay=false`` (the same settings) by the FastAPI route: the same
    answer, the same token check (a wrong one goes on to the route's 401), both counted."""
    taken = []
    serves = app_module._DefaultInspect._serves
    monkeypatch.setattr(
        app_module._DefaultInspect,
        "_serves",
        lambda self, scope: taken.append(serves(self, scope)) or taken[-1],
    )
    app = create_app(make_inspector(random_pkl), ServiceOptions(warm=(), token="t0k"))
    app.auth = {"authorization": "Bearer t0k"}  # for serve()'s /readyz
    rng = np.random.default_rng(5)
    images = [png_bytes(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(3)]
    headers = {"content-type": "image/png", "authorization": "Bearer t0k"}

    async def scenario(client):
        fast = [await client.post("/v1/inspect", content=i, headers=headers) for i in images]
        routed = [
            await client.post("/v1/inspect", content=i, headers=headers, params={"overlay": False})
            for i in images
        ]
        wrong = await client.post(
            "/v1/inspect", content=images[0], headers={**headers, "authorization": "Bearer no"}
        )
        return fast, routed, wrong, (await client.get("/metrics", headers=headers)).text

    fast, routed, wrong, metrics = serve(app, scenario)
    inspect_posts = [t for t in taken if t is not None]
    assert inspect_posts.count(True) == 3  # the three without a query, nothing else
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    for a, b in zip(fast, routed, strict=True):
        assert a.status_code == b.status_code == 200
        a, b = a.json(), b.json()
        for answer in (a, b):
            del answer["timing_ms"], answer["batch_size"]
        assert a == b
    assert fast[0].json()["settings"]["min_area"] == {"value": 0, "source": "default"}
    assert 'cheapnet_requests_total{route="/v1/inspect",status="200"} 6.0' in metrics
    assert 'cheapnet_requests_total{route="/v1/inspect",status="401"} 1.0' in metrics


@pytest.fixture(scope="module")
def random_pkl(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("random"))


def bad_requests() -> list[tuple[str, dict, int, str]]:
    """(name, httpx request arguments, status, words of the message)."""
    good = png_bytes(np.full((32, 32), 128, np.uint8))
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(sixteen_bit, format="PNG")
    png = {"content-type": "image/png"}
    form = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--b--\r\n'
    form_type = "multipart/form-data; boundary=b"
    return [
        ("empty", dict(content=b"", headers=png), 400, "empty"),
        ("truncated", dict(content=good[: len(good) // 2], headers=png), 400, "cannot decode"),
        ("not an image", dict(content=b"hello, world" * 10, headers=png), 400, "cannot decode"),
        ("16-bit", dict(content=sixteen_bit.getvalue(), headers=png), 422, "16-bit"),
        ("json", dict(content=b"{}", headers={"content-type": "application/json"}), 415, "image/"),
        ("no type", dict(content=good), 415, "Content-Type"),
        ("bytes", dict(content=b"\0" * 5000, headers=png), 413, "at most 4,000"),
        (
            "pixels",
            dict(content=png_bytes(np.zeros((65, 64), np.uint8)), headers=png),
            413,
            "4,160",
        ),
        ("threshold", dict(content=good, headers=png, params={"threshold": 2}), 422, "threshold"),
        ("min_area", dict(content=good, headers=png, params={"min_area": "x"}), 422, "min_area"),
        ("no file", dict(content=form, headers={"content-type": form_type}), 400, "no file part"),
    ]


def test_bad_input_gets_a_4xx_naming_it_and_the_next_request_is_served(random_pkl):
    inspector = make_inspector(random_pkl, batch_size=2)
    options = ServiceOptions(warm=((32, 32),), max_body_bytes=4000, max_image_pixels=4096)
    app = create_app(inspector, options)
    good = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))

    async def scenario(client):
        answers = []
        for name, request, _, _ in bad_requests():
            bad = await client.post("/v1/inspect", **request)
            after = await client.post(
                "/v1/inspect", content=good, headers={"content-type": "image/png"}
            )
            answers.append((name, bad.status_code, bad.json(), after.status_code))
        return answers

    for (name, status, body, after), (_, _, want_status, words) in zip(
        serve(app, scenario), bad_requests(), strict=True
    ):
        assert (name, status) == (name, want_status), body
        assert words in body["error"], (name, body)
        assert after == 200, name


def test_multipart_with_an_overlay_and_a_colour_image(random_pkl):
    inspector = make_inspector(random_pkl, threshold=0.5)
    app = create_app(inspector, ServiceOptions(warm=()))
    colour = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    async def scenario(client):
        files = {"image": ("part.png", png_bytes(colour), "image/png")}
        response = await client.post("/v1/inspect", files=files, params={"overlay": "true"})
        return response.status_code, response.json()

    status, body = serve(app, scenario)
    assert status == 200, body
    assert (body["width"], body["height"]) == (56, 40)
    assert "converted from mode 'RGB'" in body["warning"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.size == (56, 40) and overlay.mode == "RGB"
    assert body["settings"]["threshold"] == {"value": 0.5, "source": "service flag"}
    assert set(body["timing_ms"]) == {"decode", "queue", "compute", "total"}


def test_a_bearer_token_guards_everything_but_health_and_the_page(random_pkl):
    inspector = make_inspector(random_pkl)
    app = create_app(inspector, ServiceOptions(warm=(), token="s3cret"))
    app.auth = {"authorization": "Bearer s3cret"}
    image = png_bytes(np.zeros((16, 16), np.uint8))

    async def scenario(client):
        png = {"content-type": "image/png"}
        return {
            "health": (await client.get("/healthz")).status_code,
            "page": (await client.get("/")).status_code,
            "none": (await client.post("/v1/inspect", content=image, headers=png)).status_code,
            "wrong": (
                await client.post(
                    "/v1/inspect",
                    content=image,
                    headers={**png, "authorization": "Bearer s3cre"},
                )
            ).status_code,
            "model": (await client.get("/v1/model")).status_code,
            "metrics": (await client.get("/metrics")).status_code,
            "right": (
                await client.post("/v1/inspect", content=image, headers={**png, **app.auth})
            ).status_code,
        }

    assert serve(app, scenario) == {
        "health": 200,
        "page": 200,
        "none": 401,
        "wrong": 401,
        "model": 401,
        "metrics": 401,
        "right": 200,
    }


def test_the_inspector_labels_on_the_host_what_the_detector_labels(random_pkl):
    """The inspector's default on the CPU (the network alone, then `detections_on_host` in the
    second part) against predict.py's one program (``labels_on_host=False``): the same defects,
    scores included, components left out and masks, for a batch padded up to its compiled size
    and images cropped from their multiple of 16."""
    pytest.importorskip("cv2", reason="labels on the host need OpenCV")
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.random((3, 40, 57)) * 255, (0, 1.5, 1.5))
    images = list(smooth.astype(np.uint8))
    on_host = make_inspector(random_pkl, batch_size=4, max_components=4)
    one_program = make_inspector(random_pkl, batch_size=4, max_components=4, labels_on_host=False)
    for threshold, min_area in ((0.5, 0), (0.6, 4)):
        found = on_host.inspect_batch(0, images, threshold, min_area, keep_masks=True)
        expected = one_program.inspect_batch(0, images, threshold, min_area, keep_masks=True)
        assert [i.defects for i in found] == [i.defects for i in expected]
        assert [i.components_left_out for i in found] == [i.components_left_out for i in expected]
        for inspection, reference in zip(found, expected, strict=True):
            np.testing.assert_array_equal(inspection.mask, reference.mask)
    assert any(i.defects for i in expected) and any(i.components_left_out for i in found)


class HeldInspector(Inspector):
    """An inspector whose device calls wait for ``release``: a service under load."""

    release = threading.Event()

    def start_batch(self, *args, **kwargs):
        self.release.wait(30)
        return super().start_batch(*args, **kwargs)


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(random_pkl):
    inspector = make_inspector(random_pkl, cls=HeldInspector, batch_size=1)
    app = create_app(inspector, ServiceOptions(warm=(), max_queue=2, max_wait_ms=0))
    image = png_bytes(np.zeros((16, 16), np.uint8))
    HeldInspector.release.clear()

    async def scenario(client):
        def post():
            return client.post("/v1/inspect", content=image, headers={"content-type": "image/png"})

        held = [asyncio.ensure_future(post())]  # running: holds the only worker
        await asyncio.sleep(0.3)
        held += [asyncio.ensure_future(post()) for _ in range(2)]  # waiting: the queue is full
        await asyncio.sleep(0.3)
        refused = await post()
        HeldInspector.release.set()
        answered = await asyncio.gather(*held)
        metrics = (await client.get("/metrics")).text
        return refused, answered, metrics

    refused, answered, metrics = serve(app, scenario)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "waiting" in refused.json()["error"]
    assert [a.status_code for a in answered] == [200, 200, 200]
    assert 'cheapnet_requests_total{route="/v1/inspect",status="503"} 1.0' in metrics
    assert 'cheapnet_requests_total{route="/v1/inspect",status="200"} 3.0' in metrics
    assert "cheapnet_batch_size_count 3.0" in metrics
    assert "cheapnet_queue_depth 0.0" in metrics


class FailingKeyInspector(Inspector):
    """Fails on 17x17 images between decoding and queueing (where the batching key is made)."""

    def tiled(self, shape):
        if shape == (17, 17):
            raise RuntimeError("a fault after decoding")
        return super().tiled(shape)


def test_a_request_failing_before_it_is_queued_leaves_no_one_waiting_for_it(random_pkl):
    """A request that fails after its announcement and before `submit` withdraws it: the next
    lone request leaves at once (early dispatch) instead of waiting out the 10 s max_wait for a
    request that will never come."""
    inspector = make_inspector(random_pkl, cls=FailingKeyInspector, batch_size=4)
    app = create_app(inspector, ServiceOptions(warm=((16, 16),), max_wait_ms=10_000))
    png = {"content-type": "image/png"}

    async def scenario(client):
        with pytest.raises(RuntimeError, match="a fault after decoding"):
            await client.post(
                "/v1/inspect", content=png_bytes(np.zeros((17, 17), np.uint8)), headers=png
            )
        started = time.monotonic()
        lone = await client.post(
            "/v1/inspect", content=png_bytes(np.zeros((16, 16), np.uint8)), headers=png
        )
        return lone, time.monotonic() - started

    lone, waited = serve(app, scenario)
    assert lone.status_code == 200, lone.text
    assert waited < 5 and lone.json()["timing_ms"]["queue"] < 5000


def test_the_model_description_and_its_weights_digest(random_pkl, tmp_path):
    from cheapnet_jax.inspection import weights_digest
    from cheapnet_jax.torch_import import load_torch_checkpoint, save_torch_checkpoint

    _, variables = load_torch_checkpoint(random_pkl)
    save_torch_checkpoint(variables, tmp_path / "copy.pkl")  # the same weights, another file
    other = random_checkpoint(tmp_path, seed=1)
    app = create_app(make_inspector(random_pkl, min_area=7), ServiceOptions(warm=()))

    async def scenario(client):
        ready = (await client.get("/readyz")).json()
        return (await client.get("/v1/model")).json(), ready

    frozen_before = gc.get_freeze_count()
    model, ready = serve(app, scenario)
    # An app made inside another program leaves that program's garbage collector alone.
    assert ready["frozen_objects"] is None and gc.get_freeze_count() == frozen_before
    assert (model["variant"], model["features"], model["parameters"]) == ("S", 2, 277)
    assert model["checkpoint_path"] == str(random_pkl)
    assert model["normalization"] == {"mean": 0.348, "std": 0.278}
    assert model["defaults"]["min_area"] == {"value": 7, "source": "service flag"}
    assert model["defaults"]["threshold"] == {"value": 0.5, "source": "default"}
    assert model["calibration"] is None
    assert model["weights_digest"] == weights_digest(
        load_torch_checkpoint(tmp_path / "copy.pkl")[1]
    )
    assert model["weights_digest"] != weights_digest(load_torch_checkpoint(other)[1])
    # G = 2 labels on the host on this CPU (with OpenCV); wider models in the one program.
    assert model["labels_on_host"] is opencv_available()
    wide = make_inspector(random_checkpoint(tmp_path, features=LABELS_ON_HOST_UP_TO * 2))
    assert not wide.labels_on_host


def test_several_models_share_batches_and_answer_each_as_alone(tmp_path):
    """Three models of G = 2 (other seeds; one calibrated, one with its own normalisation)
    and one of G = 4 served at once: GET /v1/models describes each; concurrent requests for
    all four through POST /v1/models/{name}/inspect (the fast path, and the route with a
    query) are each answered as that model's own inspector answers; models of one width
    share device calls; an unknown name is a 404 naming the served ones; /v1/inspect asks
    which model; the metrics count each model's answers."""
    paths = {name: random_checkpoint(tmp_path, seed=seed) for seed, name in enumerate("abc")}
    paths["wide"] = random_checkpoint(tmp_path, seed=3, features=4)
    calibration_path(paths["b"]).write_text(json.dumps({"threshold": 0.45, "min_area": 2}))
    normalizations = {"c": (0.4, 0.3)}
    inspector = Inspector.of_models(
        [Inspector.load(p, name=n, normalization=normalizations.get(n), batch_size=8)
         for n, p in paths.items()]
    )  # fmt: skip
    app = create_app(inspector, ServiceOptions(warm=((32, 32),), max_wait_ms=300))
    rng = np.random.default_rng(5)
    images = [
        ndimage.gaussian_filter(rng.random((32, 32)) * 255, 1.5).astype(np.uint8) for _ in range(8)
    ]
    names = ["a", "b", "c", "wide", "a", "b", "c", "a"]
    png = {"content-type": "image/png"}

    async def scenario(client):
        described = (await client.get("/v1/models")).json()
        answers = await asyncio.gather(
            *(
                client.post(f"/v1/models/{name}/inspect", content=png_bytes(image), headers=png)
                for name, image in zip(names, images, strict=True)
            )
        )
        overlay = await client.post(
            "/v1/models/b/inspect",
            params={"overlay": "true"},
            content=png_bytes(images[1]),
            headers=png,
        )
        unknown = await client.post(
            "/v1/models/zz/inspect", content=png_bytes(images[0]), headers=png
        )
        unnamed = await client.post("/v1/inspect", content=png_bytes(images[0]), headers=png)
        metrics = (await client.get("/metrics")).text
        return described, answers, overlay, unknown, unnamed, metrics

    described, answers, overlay, unknown, unnamed, metrics = serve(app, scenario)
    assert [d["name"] for d in described] == ["a", "b", "c", "wide"]
    assert [d["features"] for d in described] == [2, 2, 2, 4]
    assert described[1]["defaults"]["threshold"]["value"] == 0.45
    assert described[1]["defaults"]["threshold"]["source"].startswith("calibration ")
    assert described[2]["normalization"] == {"mean": 0.4, "std": 0.3}
    assert len({d["weights_digest"] for d in described}) == 4
    for name, image, response in zip(names, images, answers, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        alone = Inspector.load(paths[name], normalization=normalizations.get(name))
        expected = alone.inspect([image])[0]
        assert answer["model"]["name"] == name
        assert answer["defects"] == [d.as_dict() for d in expected.defects], name
        assert answer["verdict"] == expected.verdict
    assert sum(len(r.json()["defects"]) for r in answers) > 0
    assert max(r.json()["batch_size"] for r in answers if r.json()["model"]["features"] == 2) > 1
    assert overlay.status_code == 200 and overlay.json()["overlay_png"]
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "no model 'zz' is served; the models: a, b, c, wide"
    assert (
        unnamed.status_code == 400 and "POST /v1/models/{name}/inspect" in unnamed.json()["error"]
    )
    assert 'cheapnet_inspections_total{model="a",verdict=' in metrics
    assert 'cheapnet_inspect_latency_seconds_count{model="wide"} 1.0' in metrics


def test_a_population_workdir_is_served_by_its_members_names(population_run):
    inspector = Inspector.load(population_run)
    app = create_app(inspector, ServiceOptions(warm=()))
    image = png_bytes(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8))

    async def scenario(client):
        models = (await client.get("/v1/models")).json()
        answer = await client.post(
            "/v1/models/seed-1/inspect", content=image, headers={"content-type": "image/png"}
        )
        return models, answer

    models, answer = serve(app, scenario)
    assert [m["name"] for m in models] == ["seed-0", "seed-1"]
    assert answer.status_code == 200 and answer.json()["model"]["name"] == "seed-1"
    alone = Inspector.load(population_run / "members" / "seed-1")
    pixels = np.asarray(Image.open(io.BytesIO(image)))
    assert answer.json()["defects"] == [d.as_dict() for d in alone.inspect([pixels])[0].defects]


# ---------------------------------------------------------------------------------------------
# The command line, as a line runs it: a new process, its own environment, 127.0.0.1.


class Server:
    """``python -m cheapnet_jax.serve`` in a process of its own."""

    def __init__(self, *args: str, token: str | None = None, cwd: Path = REPO_ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        command = [sys.executable, "-m", "cheapnet_jax.serve", "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/readyz", headers=self.headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the service was not ready in time")

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        return self.process.returncode, output


# Two worker threads inspecting at once, in a process of 2 simulated CPU devices (this test
# process has 8, where XLA:CPU's threads are enough that the deadlock did not show).
CONCURRENT_INSPECTIONS = """
import sys, threading
import jax, numpy as np
sys.path.insert(0, sys.argv[2])
from test_serve import make_inspector

assert len(jax.local_devices()) == 2
inspector = make_inspector(sys.argv[1], devices=2, batch_size=8, labels_on_host=sys.argv[3] == "1")
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (128, 128), dtype=np.uint8) for _ in range(8)]
serial = [[i.defects for i in inspector.inspect_batch(d, images, 0.5, 0)] for d in (0, 1)]
answers = {0: [], 1: []}

def inspect(device):
    for _ in range(400):
        found = inspector.inspect_batch(device, images, 0.5, 0)
        answers[device].append([i.defects for i in found])

threads = [threading.Thread(target=inspect, args=(d,)) for d in (0, 1)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert serial[0] == serial[1] and any(serial[0]), serial
assert all(a == serial[0] for d in (0, 1) for a in answers[d])
print("answered", sum(map(len, answers.values())))
"""


@pytest.mark.parametrize("labels_on_host", [False, True])
def test_two_devices_inspecting_at_once_on_the_cpu_do_not_deadlock(random_pkl, labels_on_host):
    """The service runs one worker thread per device. On the CPU the detector's labeler is a
    host callback, and two such programs executing at once on XLA:CPU can deadlock: before the
    inspector ran them one at a time on the CPU, this test hung in 2 of 4 runs (and in 1 of 3
    with 150 calls a thread). Every answer is the one the device gave alone; the same with the
    labels made on the host in the threads themselves (the service's default form)."""
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CONCURRENT_INSPECTIONS,
                str(random_pkl),
                str(REPO_ROOT / "tests"),
                str(int(labels_on_host)),
            ],
            capture_output=True,
            text=True,
            env=cli_env(devices=2),
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("two threads inspecting on two CPU devices did not finish in 180 s: deadlock")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["answered", "800"]


def test_served_from_the_command_line_drains_on_sigterm(random_pkl, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("line-7-token\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(random_pkl, elsewhere)
    server = Server(
        "--checkpoint", relative, "--token-file", str(token_file), "--warm", "32x48",
        "--max-wait-ms", "600", "--no-early-dispatch", "--max-batch", "4",
        token="line-7-token", cwd=elsewhere,
    )  # fmt: skip
    try:
        server.wait_ready()
        # The command freezes the heap after the warm-up (the imports alone are ~300,000
        # objects): no full garbage collection walks them under load.
        ready = httpx.get(f"{server.url}/readyz", headers=server.headers).json()
        assert ready["compiled"] == ["32x48"]
        assert isinstance(ready["frozen_objects"], int) and ready["frozen_objects"] > 100_000
        image = png_bytes(np.random.default_rng(2).integers(0, 256, (32, 48), dtype=np.uint8))
        png = {"content-type": "image/png"}
        post = f"{server.url}/v1/inspect"
        assert httpx.post(post, content=image, headers=png).status_code == 401
        first = httpx.post(post, content=image, headers={**png, **server.headers})
        assert first.status_code == 200, first.text
        assert first.json()["model"]["features"] == 2

        def batches() -> float:
            text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
            line = next(x for x in text.splitlines() if x.startswith("cheapnet_batch_size_count"))
            return float(line.split()[-1])

        # Request heads are bounded on every path, the line's fast path included: just under
        # 64 KiB is answered, just over is 431 and the connection closed; a head of 16 MiB
        # is refused before it is all read, and the process does not hold it.
        auth = f"authorization: {server.headers['authorization']}\r\n"
        under = raw_request(server.port, image, auth + pad_header(60_000))
        assert under[0] == 200, under
        over = raw_request(server.port, image, auth + pad_header(70_000))
        assert over[0] == 431 and over[2], over
        assert "more than the 65,536 allowed" in json.loads(over[1])["error"]
        resident = resident_bytes(server.process.pid)
        huge = raw_request(server.port, image, auth + pad_header(16 << 20))
        assert huge[0] == 431 and huge[2], huge
        assert resident_bytes(server.process.pid) - resident < 8 << 20
        assert raw_request(server.port, image, auth)[0] == 200  # and it goes on serving

        # A client that gives up while its image waits for a batch leaves no work behind.
        before = batches()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(post, content=image, headers={**png, **server.headers}, timeout=0.2)
        time.sleep(1.5)
        assert batches() == before

        # SIGTERM with requests in flight (waiting for their batch): all answered, exit 0.
        answers = []

        def client():
            answers.append(httpx.post(post, content=image, headers={**png, **server.headers}))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        status, output = server.stop()
        for thread in threads:
            thread.join(30)
        assert status == 0, output
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["defects"] == first.json()["defects"] for a in answers)
        assert "Traceback" not in output
    finally:
        server.stop()


def pad_header(size: int) -> str:
    """A header line of about ``size`` bytes."""
    return f"x-pad: {'a' * size}\r\n"


def raw_request(port: int, body: bytes, headers: str) -> tuple[int, bytes, bool]:
    """POST /v1/inspect over a plain socket, the head sent in 64 KiB pieces: ``(status, body,
    closed by the server)``; a server that closes before the head is all sent still answers
    what it read."""
    head = (
        f"POST /v1/inspect HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: image/png\r\n"
        f"content-length: {len(body)}\r\n{headers}\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            for start in range(0, len(head), 1 << 16):
                connection.sendall(head[start : start + (1 << 16)])
            connection.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the head was all read
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        head_part, _, payload = rest.partition(b"\r\n\r\n")
        fields = dict(
            line.decode().lower().split(": ", 1) for line in head_part.split(b"\r\n") if line
        )
        length = int(fields.get("content-length", 0))
        while len(payload) < length:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            payload += chunk
        closed = fields.get("connection") == "close"
        if closed:
            try:
                closed = connection.recv(1) == b""
            except ConnectionResetError:
                closed = True
        return int(status_line.split()[1]), payload, closed


def resident_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_command_line_refuses_bad_settings_in_one_line(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    cases = [
        (["--checkpoint", str(tmp_path / "none.pkl")], "none.pkl"),
        (["--model", "a b=x.pkl"], "argument --model: 'a b=x.pkl': expected NAME=PATH"),
        (["--model", "a=x.pkl", "--model", "a=y.pkl"], "--model: a name given twice"),
        (["--checkpoint", "x.pkl", "--model", "a=x.pkl"], "not allowed with argument"),
        (["--checkpoint", "x.pkl", "--warm", "512,12x"], "argument --warm: '12x': expected"),
        (["--checkpoint", "x.pkl", "--token-file", str(empty)], "--token-file"),
    ]
    for args, words in cases:
        result = subprocess.run(
            [sys.executable, "-m", "cheapnet_jax.serve", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert result.returncode in (1, 2), result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The page, in Debian's Chromium driven by Playwright (no browser download).

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt)")
def test_the_page_shows_the_overlay_and_defects_and_a_bad_file_s_error(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    if (SAMPLES / "Label" / "Labels.txt").is_file():
        checkpoint, sample = checkpoint_path(2), sorted(SAMPLES.glob("*.PNG"))[0]
    else:  # a random model with a threshold low enough to find defects
        checkpoint, sample = random_checkpoint(tmp_path), tmp_path / "sample.png"
        sample.write_bytes(png_bytes(np.random.default_rng(3).integers(0, 256, (64, 64), np.uint8)))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    server = Server("--checkpoint", str(checkpoint), "--warm", "none", "--threshold", "0.3")
    try:
        server.wait_ready()
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('G = 2')")
            page.set_input_files("#file", str(sample))
            page.wait_for_selector("tr.defect", timeout=120_000)
            assert page.is_visible("#overlay")
            assert page.inner_text("#verdict") == "NG"
            assert "threshold 0.3 (service flag)" in page.inner_text("#settings")
            page.screenshot(path=str(tmp_path / "page.png"))
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:has-text('error 400')")
            assert "cannot decode" in page.inner_text("#error")
            assert page.is_hidden("#overlay")
            browser.close()
    finally:
        status, output = server.stop()
    assert status == 0, output


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt)")
def test_the_page_lets_the_person_pick_the_model(tmp_path):
    """Two models served: the page lists them, describes the one picked, and the image goes
    to that one (the answer names it); with one model there is nothing to pick (the test
    above)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    first, second = random_checkpoint(tmp_path, seed=0), random_checkpoint(tmp_path, seed=1)
    sample = tmp_path / "sample.png"
    sample.write_bytes(png_bytes(np.random.default_rng(3).integers(0, 256, (64, 64), np.uint8)))
    server = Server("--model", f"front={first}", "--model", f"back={second}", "--warm", "none")
    try:
        server.wait_ready()
        digests = {
            m["name"]: m["weights_digest"] for m in httpx.get(f"{server.url}/v1/models").json()
        }
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#choice:not([hidden])")
            assert page.eval_on_selector_all("#models option", "o => o.map(x => x.value)") == [
                "front",
                "back",
            ]
            assert digests["front"][:19] in page.inner_text("#model")
            page.select_option("#models", "back")
            assert digests["back"][:19] in page.inner_text("#model")
            page.set_input_files("#file", str(sample))
            page.wait_for_selector("#verdict:not(:empty)", timeout=120_000)
            assert "model back" in page.inner_text("#settings")
            browser.close()
    finally:
        status, output = server.stop()
    assert status == 0, output
