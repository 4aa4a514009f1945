"""The Flax model: shapes, parameter count, errors, and both implementations vs PyTorch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheapnet_jax import VARIANTS, CheapNet, param_count
from cheapnet_jax.flops import count_params
from cheapnet_jax.model import Conv, ConvTranspose, fold_batch_norm, init_variables

torch = pytest.importorskip("torch", reason="torch is the independent reference (extra 'torch')")


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def random_variables(features: int, seed: int = 0) -> dict:
    """Variables with random weights and random BatchNorm statistics (not the init values)."""
    variables = init_variables(CheapNet(features), jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape))
        return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape))

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("features", [2**k for k in range(11)])
def test_param_count_is_137g_plus_3(features):
    variables = jax.eval_shape(lambda: init_variables(CheapNet(features), jax.random.key(0)))
    assert count_params(variables) == 137 * features + 3 == param_count(features)


def test_variants():
    assert VARIANTS == {"S": 2, "M": 32, "L": 1024}


@pytest.mark.parametrize("shape", [(1, 24, 32, 1), (1, 32, 40, 1), (2, 8, 8, 1)])
def test_size_not_multiple_of_16_is_rejected(shape):
    model = CheapNet(2)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_channels_other_than_one_are_rejected():
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        CheapNet(2).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_output_shape_and_dtype_follow_input():
    """float32 and float64 traced only (the shape and the dtype are fixed when the program is
    traced; both forms run in both precisions throughout the tests); bfloat16 input, which no
    other test feeds the model, run."""
    variables = random_variables(3)
    for dtype in (jnp.float32, jnp.float64, jnp.bfloat16):
        x = jnp.ones((2, 32, 48, 1), dtype)
        for impl in ("lax", "fused"):
            apply = CheapNet(3, impl=impl).apply
            y = (
                jax.jit(apply)(variables, x)
                if dtype == jnp.bfloat16
                else jax.eval_shape(apply, variables, x)
            )
            assert y.shape == (2, 32, 48, 1) and y.dtype == dtype


def _torch_conv(x_nhwc, kernel_hwio, bias, stride, groups):
    weight = torch.from_numpy(np.asarray(kernel_hwio).transpose(3, 2, 0, 1).copy())
    pad = kernel_hwio.shape[0] // 2
    y = torch.nn.functional.conv2d(
        torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2),
        weight,
        torch.from_numpy(np.asarray(bias)),
        stride=stride,
        padding=pad,
        groups=groups,
    )
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("impl", ["lax", "fused"])
@pytest.mark.parametrize(
    ("in_features", "features", "kernel_size", "stride", "groups"),
    [(1, 5, 3, 1, 1), (4, 4, 3, 2, 4), (3, 3, 3, 2, 3), (6, 1, 1, 1, 1), (8, 4, 3, 2, 4)],
)
def test_conv_matches_torch(impl, in_features, features, kernel_size, stride, groups):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 12, in_features))
    layer = Conv(features, kernel_size, stride, groups, impl)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    kernel = rng.standard_normal(variables["params"]["kernel"].shape)
    bias = rng.standard_normal(features)
    y = layer.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    expected = _torch_conv(x, kernel, bias, stride, groups)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["lax", "fused"])
@pytest.mark.parametrize(
    ("in_features", "features", "groups"), [(1, 1, 1), (3, 3, 3), (8, 4, 4), (2, 1, 1)]
)
def test_conv_transpose_matches_torch(impl, in_features, features, groups):
    """Compared with torch's ConvTranspose2d(stride 2, padding 1, output_padding 1, groups)."""
    from cheapnet_jax.torch_import import _transposed_torch_to_hwio

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 7, in_features))
    torch_weight = rng.standard_normal((in_features, features // groups, 3, 3))
    bias = rng.standard_normal(features)
    params = {"kernel": _transposed_torch_to_hwio(torch_weight, groups), "bias": bias}
    y = ConvTranspose(features, groups, impl).apply({"params": params}, jnp.asarray(x))
    expected = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(torch_weight),
        torch.from_numpy(bias),
        stride=2,
        padding=1,
        output_padding=1,
        groups=groups,
    ).permute(0, 2, 3, 1)
    assert y.shape == (2, 10, 14, features)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("features", "height", "width", "use_jit"),
    [
        (1, 16, 16, False),
        (2, 32, 48, True),
        (5, 48, 32, True),
        pytest.param(16, 32, 32, True, marks=pytest.mark.slow),
    ],
)
def test_fused_equals_lax_inference_and_gradients(features, height, width, use_jit):
    variables = random_variables(features, seed=features)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, height, width, 1)))

    def loss(params, impl):
        logits = CheapNet(features, impl=impl).apply({**variables, "params": params}, x)
        return jnp.sum(jnp.tanh(logits)), logits

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if use_jit:
        grad_fn = jax.jit(grad_fn, static_argnums=1)
    (_, logits_lax), grads_lax = grad_fn(variables["params"], "lax")
    (_, logits_fused), grads_fused = grad_fn(variables["params"], "fused")
    np.testing.assert_allclose(logits_fused, logits_lax, rtol=0, atol=1e-9)
    leaves_fused, leaves_lax = jax.tree.leaves(grads_fused), jax.tree.leaves(grads_lax)
    for g_fused, g_lax in zip(leaves_fused, leaves_lax, strict=True):
        np.testing.assert_allclose(g_fused, g_lax, rtol=1e-9, atol=1e-9)


def test_train_mode_batchnorm_matches_torch():
    """Train-mode BatchNorm: normalise with the biased batch variance, update running_var with
    the unbiased one (PyTorch's rule), momentum 0.1 in PyTorch terms."""
    from torch_reference import TorchCheapNet

    from cheapnet_jax.torch_import import state_dict_to_variables

    features = 3
    reference = TorchCheapNet(features).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    variables = state_dict_to_variables(reference.state_dict(), dtype=np.float64)
    x = np.random.default_rng(4).standard_normal((3, 32, 32, 1))

    reference.train()
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    for impl in ("lax", "fused"):
        # Jitted: eagerly, each of the forward's ops is a program compiled on its own.
        apply = jax.jit(
            functools.partial(
                CheapNet(features, impl=impl).apply, train=True, mutable=["batch_stats"]
            )
        )
        logits, updates = apply(variables, jnp.asarray(x))
        np.testing.assert_allclose(logits, expected.detach().numpy(), rtol=0, atol=1e-9)
        new_stats = state_dict_to_variables(reference.state_dict(), dtype=np.float64)["batch_stats"]
        for got, want in zip(
            jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(new_stats), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_fused_and_lax_masks_agree_in_float32():
    """float32: the two forms round differently, but their masks agree on all but 1e-5."""
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_variables(8, seed=7))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 64, 64, 1)), jnp.float32)
    logits = [
        np.asarray(jax.jit(CheapNet(8, impl=impl).apply)(variables, x)) for impl in ("lax", "fused")
    ]
    threshold = np.median(logits[0])  # random weights: split the pixels half and half
    masks = [values > threshold for values in logits]
    assert 0.4 < masks[0].mean() < 0.6
    assert np.mean(masks[0] != masks[1]) <= 1e-5


@pytest.mark.parametrize("impl", ["lax", "fused"])
def test_folded_batch_norm_computes_what_the_model_computes(impl):
    """float64: BatchNorm folded into the convolutions (plain and transposed) gives the
    inference-mode model's logits to rounding."""
    variables = random_variables(4, seed=3)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 48, 1)))
    expected = CheapNet(4, impl=impl).apply(variables, x)
    folded = fold_batch_norm(variables)
    assert set(folded) == {"params"}
    assert all(set(block) == {"conv", "storage_offset"} for block in folded["params"].values())
    found = jax.jit(CheapNet(4, impl=impl, folded=True).apply)(folded, x)
    assert found.dtype == jnp.float64 and float(jnp.std(expected)) > 0.1
    np.testing.assert_allclose(np.asarray(found), np.asarray(expected), rtol=1e-11, atol=1e-11)
    with pytest.raises(ValueError, match="inference only"):
        CheapNet(4, folded=True).apply(folded, x, train=True)
