"""cheapnet_jax.host_allocator: importing cheapnet_jax keeps XLA:CPU's freed temporary buffers.

The reference is the same program in a process that opted out (glibc's defaults): there, each
call faults in CheapNet-M's ~130 MiB of temporaries afresh; with the setting, it reuses them.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from conftest import cli_env

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator setting is glibc's (Linux)",
)

# Minor page faults of CheapNet-M on one 512x512 image: the fewest of 5 calls after a warm-up
# (the fewest: code pages of jaxlib evicted by other processes' memory also fault again).
PROGRAM = """
import resource
import cheapnet_jax
import jax, jax.numpy as jnp
from cheapnet_jax.model import CheapNet, init_variables, inference_logits

model = CheapNet(32)
variables = init_variables(model, jax.random.key(0))
x = jnp.zeros((1, 512, 512, 1), jnp.float32)
run = jax.jit(lambda v, x: inference_logits(model, v, x))
run(variables, x).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(variables, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(cheapnet_jax.HOST_ALLOCATOR)
print(min(faults))
"""


def _faults_per_call(**env: str) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        capture_output=True,
        text=True,
        env={**cli_env(), **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    state, faults = done.stdout.strip().splitlines()[-2:]
    return state, float(faults)


def test_import_keeps_temporaries_that_the_system_default_faults_in_on_every_call():
    kept_state, kept = _faults_per_call()
    system_state, system = _faults_per_call(CHEAPNET_JAX_MALLOC="system")
    assert kept_state == "kept (glibc, one arena)"
    assert system_state == "system defaults (CHEAPNET_JAX_MALLOC=system)"
    # 130 MiB of temporaries are about 33,000 pages of 4 KiB.
    assert system > 20_000, f"the opted-out process faulted only {system:.0f} pages per call"
    assert kept < system / 4, f"kept: {kept:.0f} faults per call, system defaults: {system:.0f}"


# A notebook comparing widths: eager `model.apply` of CheapNet-M in float64 then float32, on a
# batch of 2 at 512x512 and 3 at 256x384; the process's peak resident memory.
SEQUENCE = """
import resource
import cheapnet_jax
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from cheapnet_jax.model import CheapNet, init_variables

model = CheapNet(32)
variables = init_variables(model, jax.random.key(0))
for dtype in (jnp.float64, jnp.float32):
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    for shape in ((2, 512, 512, 1), (3, 256, 384, 1)):
        x = jax.random.normal(jax.random.key(1), shape, dtype)
        model.apply(cast, x, train=False).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_kept_memory_does_not_accumulate_across_programs_past_the_system_default():
    # Both processes at once (about 30 s each, mostly eager compilations). Without the release
    # after each compilation the kept process peaked at 2.1x (3.3 against 1.6 GiB).
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", SEQUENCE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**cli_env(), **env},
        )
        for name, env in {"kept": {}, "system": {"CHEAPNET_JAX_MALLOC": "system"}}.items()
    }
    peaks = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        peaks[name] = float(out.strip().splitlines()[-1])
    assert peaks["kept"] <= 1.2 * peaks["system"], f"peak resident MiB: {peaks}"
