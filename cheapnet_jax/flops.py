"""What a model costs: parameter count and GFLOPs per image, in two conventions.

XLA's cost analysis counts what the compiled inference pass computes (2 FLOPs per multiply-add,
bias, BatchNorm, activations included); the paper's figures are thop's count (conv multiply-adds
without bias, transposed conv as if no input were zero, 4 per BatchNorm element).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax.model import CheapNet

PAPER_FLOPS_PER_G = 12_686_336
PAPER_FLOPS_CONSTANT = 1_048_576
PAPER_IMAGE_PIXELS = 512 * 512


def count_params(variables: Mapping) -> int:
    """Number of trainable parameters (the ``params`` collection)."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"])))


def paper_gflops(features: int, height: int = 512, width: int = 512) -> float:
    """The paper's GFLOPs per image (thop: conv multiply-adds without bias + 4 per BN element).

    12,686,336*G + 1,048,576 at 512x512; every term scales with the pixel count.
    """
    per_512 = PAPER_FLOPS_PER_G * features + PAPER_FLOPS_CONSTANT
    return per_512 * (height * width) / PAPER_IMAGE_PIXELS / 1e9


def xla_gflops(model: CheapNet, variables: Mapping, height: int = 512, width: int = 512) -> float:
    """GFLOPs per image that XLA's cost analysis counts for the compiled inference pass.

    XLA counts a multiply-add as 2 FLOPs and includes bias, BatchNorm, LeakyReLU and sigmoid.
    The count is of the reference (``lax`` convolution) form, whatever ``model.impl`` is: the
    fused CPU form computes the same arithmetic, but XLA also counts its padding and shifts.
    """
    reference = CheapNet(model.features, impl="lax")
    spec = jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32)
    lowered = jax.jit(lambda v, x: jax.nn.sigmoid(reference.apply(v, x))).lower(variables, spec)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / 1e9
