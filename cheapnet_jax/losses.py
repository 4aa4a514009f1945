"""Training losses: binary cross-entropy on logits (default) and the authors' exact form.

The authors train with ``BCELoss()(torch.sigmoid(logits), masks)``. Mathematically that is
binary cross-entropy on logits, but PyTorch evaluates it on the *probabilities*: it clamps
each log at -100, and its backward divides by ``max(p * (1 - p), 1e-12)``. The two agree only
while no logit saturates. Where a logit is large (float32's sigmoid rounds to exactly 1 from
about 16.6; float64's from about 36.7) the authors' loss is capped and that pixel gets no
gradient; where a wrongly negative logit is below about -27.6 its gradient shrinks towards 0
instead of -1. ``"bce-sigmoid"`` reproduces that behaviour, value and gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOG_CLAMP = -100.0
"""PyTorch's BCELoss clamps ``log(p)`` and ``log(1 - p)`` at -100."""
BACKWARD_EPSILON = float(np.float32(1e-12))
"""PyTorch's BCELoss backward divides by ``max(p * (1 - p), EPSILON)``; its EPSILON is the
C++ ``float`` 1e-12, i.e. 9.9999999600e-13 also in float64 (the exact value matters there)."""

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def bce_with_logits(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean binary cross-entropy computed from logits (numerically stable at any logit)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype)))


@jax.custom_vjp
def torch_bce(probabilities: jax.Array, targets: jax.Array) -> jax.Array:
    """PyTorch's ``BCELoss()(probabilities, targets)`` (mean), forward and backward."""
    log_p = jnp.maximum(jnp.log(probabilities), LOG_CLAMP)
    log_not_p = jnp.maximum(jnp.log1p(-probabilities), LOG_CLAMP)
    return jnp.mean((targets - 1) * log_not_p - targets * log_p)


def _torch_bce_forward(probabilities, targets):
    return torch_bce(probabilities, targets), (probabilities, targets)


def _torch_bce_backward(residuals, cotangent):
    probabilities, targets = residuals
    denominator = jnp.maximum((1 - probabilities) * probabilities, BACKWARD_EPSILON)
    grad = cotangent * (probabilities - targets) / denominator / probabilities.size
    return grad, jnp.zeros_like(targets)


torch_bce.defvjp(_torch_bce_forward, _torch_bce_backward)


def bce_on_sigmoid(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """The authors' ``BCELoss()(sigmoid(logits), masks)``, saturation included."""
    return torch_bce(jax.nn.sigmoid(logits), masks.astype(logits.dtype))


LOSSES: dict[str, Loss] = {"bce-logits": bce_with_logits, "bce-sigmoid": bce_on_sigmoid}
"""``--loss`` choices: name -> ``loss(logits [B, H, W, 1], masks [B, H, W, 1]) -> scalar``."""
