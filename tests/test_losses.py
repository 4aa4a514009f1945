"""The two training losses against PyTorch: BCE on logits, and the authors' exact
``BCELoss()(sigmoid(logits), masks)``, value and gradient, on saturated logits too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheapnet_jax.losses import bce_on_sigmoid, bce_with_logits

torch = pytest.importorskip("torch")

# Logits on both sides of every regime: float32's sigmoid rounds to 1 from about 16.6, float64's
# from about 36.7; PyTorch's clamp of log(p) at -100 and its backward's 1e-12 floor act from
# about -27.6 on the negative side.
LOGITS = np.array(
    [-120, -60, -46, -30, -27.7, -20, -16.7, -5, -1e-3, 0, 0.3, 5, 16.5, 16.7, 20, 27, 36, 37,
     46, 60, 120.0]
)  # fmt: skip
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def torch_loss_and_grad(logits: np.ndarray, targets: np.ndarray):
    x = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.BCELoss()(torch.sigmoid(x), torch.tensor(targets))
    loss.backward()
    return loss.item(), x.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_bce_on_sigmoid_is_pytorchs_bceloss_on_saturated_logits(dtype, jit):
    rng = np.random.default_rng(0)
    logits = LOGITS.astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        mixed = rng.random(logits.shape) < 0.5
        for targets in (np.zeros_like(logits), np.ones_like(logits), mixed.astype(dtype)):
            expected_loss, expected_grad = torch_loss_and_grad(logits, targets)
            value_and_grad = jax.value_and_grad(bce_on_sigmoid)
            if jit:
                value_and_grad = jax.jit(value_and_grad)
            loss, grad = value_and_grad(jnp.asarray(logits), jnp.asarray(targets))
            assert loss.dtype == dtype and grad.dtype == dtype
            rtol = 1e-6 if dtype == np.float32 else 1e-14
            np.testing.assert_allclose(float(loss), expected_loss, rtol=rtol)
            scale = np.abs(expected_grad).max()
            np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0, atol=rtol * scale)
            # PyTorch gives no gradient where float's sigmoid saturated to exactly 1.
            saturated = torch.sigmoid(torch.tensor(logits)).numpy() == 1
            assert saturated.any()
            assert np.all(np.asarray(grad)[saturated & (targets == 0)] == 0)


def test_the_two_losses_agree_until_a_logit_saturates():
    with jax.enable_x64(True):
        moderate = jnp.asarray(np.linspace(-8, 8, 33))
        targets = jnp.asarray((np.arange(33) % 3 == 0).astype(np.float64))
        np.testing.assert_allclose(
            bce_on_sigmoid(moderate, targets), bce_with_logits(moderate, targets), rtol=1e-12
        )
        grads = [jax.grad(loss)(moderate, targets) for loss in (bce_on_sigmoid, bce_with_logits)]
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-15)
        # A background pixel at logit 46: BCE on logits charges 46 for it; the authors' loss
        # caps it at 100 in theory but float64's sigmoid is exactly 1 there, so log(1 - p)
        # is clamped to -100.
        saturated = jnp.asarray([46.0])
        assert float(bce_with_logits(saturated, jnp.zeros(1))) == pytest.approx(46.0)
        assert float(bce_on_sigmoid(saturated, jnp.zeros(1))) == pytest.approx(100.0)
