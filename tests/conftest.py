"""Shared test fixtures: paths to ../shared material and skip rules when it is absent; a small
training configuration."""

from __future__ import annotations

import os
from pathlib import Path

# Eight host devices for the multi-device tests; set before anything imports JAX.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

# One persistent compilation cache for the session's xdist workers and the CLI processes the
# tests start (they inherit these variables through `cli_env`): a program compiled by one is read
# back by all the others. The cache key covers the cache's folder (jax writes it into the compile
# options), so per-worker folders shared nothing. Concurrent use is safe because the size limit
# turns on jax's file lock around every read and write of the folder. A corrupt or stale entry
# is only a warning (jax_raise_persistent_cache_errors is off) and the program is compiled again.
# Kept between runs in the ignored .jax-cache/; CHEAPNET_TEST_CACHE=0 turns it off.
if os.environ.get("CHEAPNET_TEST_CACHE", "1") != "0":
    _cache = Path(__file__).resolve().parents[1] / ".jax-cache" / "tests"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
    # Programs that took 0.5 s or more to compile: with 0, every eager op's tiny program was
    # written (with jax's file lock) and a full run took 30:42 instead of 19:56 (measured).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cheapnet_jax.training import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHEAPNET_SHARED", REPO_ROOT.parent / "shared"))
CHECKPOINTS = SHARED / "torch-checkpoints"
SAMPLES = SHARED / "dagm-samples" / "Class6" / "Train"
CHECKPOINT_FEATURES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def cli_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a user's shell for a command-line tool: this process's XLA_FLAGS
    (8 simulated devices) removed, or ``devices`` simulated CPU devices when given."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a coordinator or a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(
    script: str, *args: str, devices: int | None = None, cwd=REPO_ROOT, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``script`` (``train.py``, ``-m cheapnet_jax.cli.export``, ...) as a user would: a new
    process, its own device count (see `cli_env`), output captured."""
    target = ["-m", script[3:]] if script.startswith("-m ") else [str(REPO_ROOT / script)]
    return subprocess.run(
        [sys.executable, *target, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(devices),
        timeout=timeout,
    )


def kill_at_first_checkpoint(process: subprocess.Popen, latest: Path, timeout: float = 600):
    """SIGKILL ``process`` as soon as a step folder appears in ``latest`` (a checkpoints/latest
    folder); fails the test when the process had ended before."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (
        latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


def shared_across_workers(tmp_path_factory, name: str, build) -> Path:
    """A folder ``name`` made once per test session by ``build(folder)`` and read by every xdist
    worker: the first worker to ask builds it under a file lock while the other waits for it
    (xdist's own grouping is not reliable for this; see the pytest-xdist docs, "Making
    session-scoped fixtures execute only once"). Tests treat it as read-only (copy it to
    change it). A build that fails leaves no folder behind, and the next test to ask builds
    it again (and fails with the same message)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def population_run(tmp_path_factory) -> Path:
    """A population workdir of two CheapNet-S members (seeds 0 and 1: ``seed-0``, ``seed-1``)
    trained on synthetic 32x32 images (`small_config`), made once per session and read-only
    (copy it to change it)."""

    def build(folder: Path) -> None:
        from cheapnet_jax.population import parse_axis, population_grid, train_population

        train_population(small_config(folder), population_grid([parse_axis("seed=0,1")]))

    return shared_across_workers(tmp_path_factory, "population-seeds", build)


def checkpoint_path(features: int) -> Path:
    """The authors' checkpoint of width G; skips the test when it is not there."""
    path = CHECKPOINTS / f"CheapNet_G{features}.pkl"
    if not path.is_file():
        pytest.skip(f"{path} absent: the authors' checkpoints live in ../shared/torch-checkpoints")
    return path


@pytest.fixture
def samples_folder() -> Path:
    if not (SAMPLES / "Label" / "Labels.txt").is_file():
        pytest.skip(f"{SAMPLES} absent: the real DAGM samples live in ../shared/dagm-samples")
    return SAMPLES


def small_config(workdir, **overrides) -> TrainConfig:
    """CheapNet-S for two epochs on a few 32x32 synthetic images: seconds on the CPU."""
    settings = dict(
        features=2,
        devices=1,
        epochs=2,
        batch_size=4,
        image_size=32,
        synthetic_train=8,
        synthetic_validation=6,
        workdir=str(workdir),
        progress=False,
        milestones=(1,),
    )
    return TrainConfig(**{**settings, **overrides})


# Tests that start other processes (the CLIs, servers, several jax.distributed processes) are
# marked `process`, and tests that train a model in this process `training`, from their source,
# their fixtures' source and the source of their module's helper functions that they call, so
# that `make test-fast` can leave them out: the unit tests alone.
_MARKER_WORDS = {
    "process": ("run_tool(", "subprocess.", "Popen(", "Server("),
    "training": ("train_and_evaluate(", "train_population(", "parallel_train_step("),
}


def _source(function) -> str:
    import inspect

    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _marker_words(module, marker: str) -> tuple[str, ...]:
    """The marker's words, and ``name(`` for each helper function of ``module`` (not a test)
    whose source holds one of them."""
    import inspect

    words = _MARKER_WORDS[marker]
    helpers = [
        f"{name}("
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("test_")
        and any(word in _source(value) for word in words)
    ]
    return (*words, *helpers)


def pytest_collection_modifyitems(config, items):
    words_of = {}
    for item in items:
        functions = [getattr(item, "function", None)]
        fixture_info = getattr(item, "_fixtureinfo", None)
        if fixture_info is not None:
            for definitions in fixture_info.name2fixturedefs.values():
                functions += [d.func for d in definitions]
        sources = [_source(f) for f in functions if f is not None]
        for marker in _MARKER_WORDS:
            key = (item.module.__name__, marker)
            if key not in words_of:
                words_of[key] = _marker_words(item.module, marker)
            if any(word in source for word in words_of[key] for source in sources):
                item.add_marker(getattr(pytest.mark, marker))
