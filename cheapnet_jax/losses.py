"""Training losses: binary cross-entropy on logits (default), the authors' exact form, and for
small, imbalanced sets positively weighted BCE, soft Dice, Focal, and sums of them
(``bce-logits+dice``: `loss_named`).

The authors train with ``BCELoss()(torch.sigmoid(logits), masks)``. Mathematically that is
binary cross-entropy on logits, but PyTorch evaluates it on the *probabilities*: it clamps
each log at -100, and its backward divides by ``max(p * (1 - p), 1e-12)``. The two agree only
while no logit saturates. Where a logit is large (float32's sigmoid rounds to exactly 1 from
about 16.6; float64's from about 36.7) the authors' loss is capped and that pixel gets no
gradient; where a wrongly negative logit is below about -27.6 its gradient shrinks towards 0
instead of -1. ``"bce-sigmoid"`` reproduces that behaviour, value and gradient.
"""

from __future__ import annotations

import functools
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


POS_WEIGHT = 10.0
"""``--pos-weight``'s default: how much more a defect pixel counts in ``bce-weighted``."""
DICE_SMOOTHING = 1.0
"""Added to the soft Dice's numerator and denominator: a batch without defects, predicted
without defects, scores 0 loss rather than 0/0."""
FOCAL_GAMMA = 2.0
"""The focusing exponent of the Focal loss (Lin et al.'s default)."""


def weighted_bce(logits: jax.Array, masks: jax.Array, pos_weight: float = POS_WEIGHT) -> jax.Array:
    """Mean BCE on logits with defect pixels weighted ``pos_weight`` (PyTorch's
    ``BCEWithLogitsLoss(pos_weight=...)``)."""
    targets = masks.astype(logits.dtype)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -jnp.mean(pos_weight * targets * log_p + (1 - targets) * log_not_p)


def soft_dice(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """1 - the soft Dice coefficient of the sigmoid probabilities over the whole batch."""
    probabilities = jax.nn.sigmoid(logits)
    targets = masks.astype(logits.dtype)
    overlap = jnp.sum(probabilities * targets)
    total = jnp.sum(probabilities) + jnp.sum(targets)
    return 1 - (2 * overlap + DICE_SMOOTHING) / (total + DICE_SMOOTHING)


def focal(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean Focal loss (optax's ``sigmoid_focal_loss``, gamma `FOCAL_GAMMA`, no alpha)."""
    targets = masks.astype(logits.dtype)
    return jnp.mean(optax.sigmoid_focal_loss(logits, targets, gamma=FOCAL_GAMMA))


LOSSES: dict[str, Loss] = {
    "bce-logits": bce_with_logits,
    "bce-sigmoid": bce_on_sigmoid,
    "bce-weighted": weighted_bce,
    "dice": soft_dice,
    "focal": focal,
}
"""``--loss`` terms: name -> ``loss(logits [B, H, W, 1], masks [B, H, W, 1]) -> scalar``; a
``--loss`` is one of them or a sum such as ``bce-logits+dice`` (`loss_named`)."""


def check_loss_name(name: str) -> None:
    """ValueError naming the unknown term of a ``--loss`` (one term, or terms joined by +)."""
    terms = name.split("+")
    unknown = [term for term in terms if term not in LOSSES]
    if unknown or len(set(terms)) != len(terms):
        what = f"unknown term {unknown[0]!r}" if unknown else "a repeated term"
        raise ValueError(
            f"loss {name!r}: {what}; a loss is one of {', '.join(LOSSES)} or a sum of them "
            "joined by + (e.g. bce-logits+dice)"
        )


def loss_named(name: str, pos_weight: float = POS_WEIGHT) -> Loss:
    """The loss of a ``--loss`` name: one term of `LOSSES` or their sum (``a+b``)."""
    check_loss_name(name)
    terms = [
        functools.partial(weighted_bce, pos_weight=pos_weight)
        if term == "bce-weighted"
        else LOSSES[term]
        for term in name.split("+")
    ]
    if len(terms) == 1:
        return terms[0]
    return lambda logits, masks: sum(term(logits, masks) for term in terms)
