"""The accelerator path, proven from a CPU host: the whole detector lowered for CUDA.

`jax.export` lowers for a platform that this machine does not have. With the defaults
(``impl="auto"``, ``method="auto"``), the choices are made per lowering platform, so the CUDA
module must carry the accelerator path (no host callback, the union-find's single loop) while
the same program lowered for the CPU keeps its host callbacks.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheapnet_jax import CheapNet
from cheapnet_jax.detection import detections_from_probabilities, make_detector
from cheapnet_jax.model import init_variables

# A host callback lowers to a custom call whose target names it (``xla_ffi_python_cpu_callback``
# and the like); location strings may contain the word anyway (test names, for one).
HOST_CALLBACK = re.compile(r"custom_call\s*@\w*callback")


def detector_and_arguments(batch: int = 4, size: int = 64, dtype: str = "float32"):
    model = CheapNet(features=2)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
    return make_detector(model, threshold=0.5, max_components=32, dtype=dtype), variables, images


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_detector_lowered_for_cuda_has_no_host_callback_and_one_loop(dtype):
    detector, variables, images = detector_and_arguments(dtype=dtype)
    exported = jax.export.export(detector, platforms=["cuda"])(variables, images)
    module = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert not HOST_CALLBACK.search(module)
    assert module.count("stablehlo.while") == 1  # the union-find's rounds; nothing else loops
    assert "stablehlo.scatter" in module and "stablehlo.convolution" in module  # lax layers
    # bfloat16 activations between blocks, and only then
    assert ("xbf16>" in module) == (dtype == "bfloat16")


def test_the_same_program_lowered_for_the_cpu_keeps_the_cpu_path():
    """The contrast that makes the test above mean something: on the CPU the labeler is scipy
    through a host callback and the layers are the fused forms (no convolution op)."""
    detector, variables, images = detector_and_arguments()
    module = detector.lower(variables, images).as_text()
    assert HOST_CALLBACK.search(module)
    assert "stablehlo.convolution" not in module


def test_accelerator_choices_compute_what_the_cpu_defaults_compute():
    """What the CUDA module computes, run here with its choices forced (``impl="lax"``,
    ``method="union_find"``), against the CPU defaults: the same probabilities to float
    rounding, and from the same probabilities the same labels, boxes, areas and scores."""
    variables = init_variables(CheapNet(features=2), jax.random.PRNGKey(1))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 1)), jnp.float32)
    default = make_detector(CheapNet(features=2), threshold=0.5)(variables, images)
    accelerator = make_detector(CheapNet(features=2, impl="lax"), method="union_find")(
        variables, images
    )
    np.testing.assert_allclose(accelerator.probabilities, default.probabilities, atol=1e-5)
    on_default_probabilities = jax.jit(
        lambda p: detections_from_probabilities(p, threshold=0.5, method="union_find")
    )(default.probabilities)
    assert int(default.valid.sum()) > 0
    for name in ("labels", "stats", "valid", "overflow"):
        np.testing.assert_array_equal(
            getattr(on_default_probabilities, name), getattr(default, name), err_msg=name
        )
    np.testing.assert_allclose(on_default_probabilities.scores, default.scores, rtol=1e-6)
