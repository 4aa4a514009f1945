"""CheapNet in Flax Linen, NHWC.

The architecture is the one of the authors' released checkpoints (see the README's
"Architecture" section): a U-shaped net whose width G is constant,

    encoder1   3x3 conv 1->G                     H
    encoder2   3x3 depthwise conv, stride 2      H/2
    encoder3   3x3 depthwise conv, stride 2      H/4
    encoder4   3x3 depthwise conv, stride 2      H/8
    bottleneck 3x3 depthwise conv, stride 2      H/16
    decoder1   3x3 grouped transposed conv G->G, stride 2            (bottleneck)
    decoder2   3x3 grouped transposed conv 2G->G, stride 2, groups G (encoder4, decoder1)
    decoder3   ...                                                   (encoder3, decoder2)
    decoder4   ...                                                   (encoder2, decoder3)
    output     1x1 conv 2G->1                                        (encoder1, decoder4)

every conv with a bias and followed by BatchNorm and LeakyReLU(0.2). The model returns the
pre-sigmoid logits (the output block's LeakyReLU output); probabilities are their sigmoid.

Every layer has two interchangeable implementations over the same parameters:

- ``"lax"``: the reference, `jax.lax.conv_general_dilated` with `feature_group_count` (and
  `lhs_dilation` for the transposed convolutions);
- ``"fused"``: shifted multiply-adds that XLA fuses into a few loops. XLA:CPU runs grouped
  convolutions through a slow generic path, so this form is much faster there.

``impl="auto"`` picks ``"fused"`` where the program is lowered for the CPU and ``"lax"`` where it
is lowered for an accelerator (`cheapnet_jax.platform.per_platform`).
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cheapnet_jax.platform import per_platform

VARIANTS: dict[str, int] = {"S": 2, "M": 32, "L": 1024}
"""The paper's variants: name -> width G."""

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: new = momentum * old + (1 - momentum) * batch (PyTorch's 0.1).
LEAKY_SLOPE = 0.2
SIZE_MULTIPLE = 16  # four stride-2 stages: H and W must divide by 2**4.

Impl = Literal["auto", "lax", "fused"]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _by_impl(impl: Impl, lax_form, fused_form, *operands) -> jax.Array:
    forms = {"lax": lax_form, "fused": fused_form}
    return per_platform(impl, forms, *operands, name="impl", cpu="fused", accelerator="lax")


def param_count(features: int) -> int:
    """Number of trainable parameters of CheapNet with width ``features`` (137*G + 3)."""
    return 137 * features + 3


def _grouped_pointwise(x: jax.Array, kernel_tap: jax.Array, groups: int) -> jax.Array:
    """One kernel tap of a grouped convolution as element-wise multiply-adds.

    x: [B, H, W, Cin]; kernel_tap: [Cin/groups, Cout] (one spatial tap of an HWIO kernel).
    Returns [B, H, W, Cout] with
    out[..., g*r_out + o] = sum_s x[..., g*r_in + s] * k[s, g*r_out + o].
    The sum over s is written as r_in strided channel slices rather than a reduction over a
    small axis, which XLA:CPU turns into a slow loop (BENCHMARKS.md, "Layer forms").
    """
    in_per_group, out_features = kernel_tap.shape
    out_per_group = out_features // groups
    if groups == 1:
        # A matrix product, also for one input channel (encoder1): its weight gradient is then a
        # matrix product too, which XLA:CPU runs faster than the broadcast form's reduction.
        return jnp.dot(x, kernel_tap)
    batch_shape = x.shape[:3]
    y = None
    for s in range(in_per_group):
        channel = x[..., s::in_per_group] if in_per_group > 1 else x  # [B, H, W, groups]
        if out_per_group == 1:  # depthwise, and CheapNet's grouped transposed convolutions
            term = _scale_channels(channel, kernel_tap[s])
        else:
            weights = kernel_tap[s].reshape(groups, out_per_group)
            term = (channel[..., None] * weights).reshape(*batch_shape, out_features)
        y = term if y is None else y + term
    return y


def _scale_channels(x: jax.Array, weights: jax.Array) -> jax.Array:
    """``x * weights`` for x ``[B, H, W, C]`` and weights ``[C]``.

    Written on the rows ``[B * H, W * C]`` with the weights tiled W times, so that the weight
    gradient is a reduction over rows W * C wide, which XLA:CPU vectorises, rather than one that
    keeps a minor dimension of C (2 for CheapNet-S), which it does not (BENCHMARKS.md, "Layer
    forms").
    """
    batch, height, width, channels = x.shape
    rows = x.reshape(batch * height, width * channels)
    return (rows * jnp.tile(weights, width)).reshape(x.shape)


def _shift_up_left(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """x[:, i + rows, j + cols] with zeros past the bottom/right edge (rows, cols in {0, 1})."""
    padded = jnp.pad(x, ((0, 0), (0, rows), (0, cols), (0, 0)))
    return padded[:, rows : rows + x.shape[1], cols : cols + x.shape[2], :]


def _kernel_and_bias(
    module: nn.Module, x: jax.Array, kernel_size: int
) -> tuple[jax.Array, jax.Array]:
    """A grouped layer's HWIO kernel ``[k, k, Cin/groups, features]`` and bias, in x's dtype."""
    in_features, features, groups = x.shape[-1], module.features, module.groups
    if in_features % groups or features % groups:
        raise ValueError(
            f"{in_features} input and {features} output channels do not split into {groups} groups"
        )
    shape = (kernel_size, kernel_size, in_features // groups, features)
    kernel = module.param("kernel", nn.initializers.kaiming_uniform(), shape)
    bias = module.param("bias", nn.initializers.zeros, (features,))
    return kernel.astype(x.dtype), bias.astype(x.dtype)


class Conv(nn.Module):
    """Square convolution with 'same' padding (k//2), optional stride 2 and groups; with bias.

    The kernel is HWIO, ``[k, k, Cin/groups, features]``, exactly what `lax.conv_general_dilated`
    takes with ``feature_group_count=groups``.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    impl: Impl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _kernel_and_bias(self, x, self.kernel_size)
        pad = self.kernel_size // 2

        def lax_form(x: jax.Array, kernel: jax.Array) -> jax.Array:
            return lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)),
                dimension_numbers=_DIMENSION_NUMBERS,
                feature_group_count=self.groups,
            )

        def fused_form(x: jax.Array, kernel: jax.Array) -> jax.Array:
            return self._fused(x, kernel, pad)

        return _by_impl(self.impl, lax_form, fused_form, x, kernel) + bias

    def _fused(self, x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
        k, s = self.kernel_size, self.stride
        out_h = (x.shape[1] + 2 * pad - k) // s + 1
        out_w = (x.shape[2] + 2 * pad - k) // s + 1
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        y = None
        for di in range(k):
            for dj in range(k):
                rows = slice(di, di + s * (out_h - 1) + 1, s)
                cols = slice(dj, dj + s * (out_w - 1) + 1, s)
                window = padded[:, rows, cols]
                term = _grouped_pointwise(window, kernel[di, dj], self.groups)
                y = term if y is None else y + term
        return y


class ConvTranspose(nn.Module):
    """3x3 stride-2 transposed convolution with groups, PyTorch's padding 1, output_padding 1.

    Output size is exactly twice the input size. The kernel is stored as the HWIO kernel of the
    equivalent forward convolution over the 2x-dilated input (`lhs_dilation=2`, padding (1, 2)):
    ``[3, 3, Cin/groups, features]``, i.e. PyTorch's ``(Cin, Cout/groups, 3, 3)`` regrouped and
    spatially flipped (`cheapnet_jax.torch_import` does that conversion).
    """

    features: int
    groups: int = 1
    impl: Impl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _kernel_and_bias(self, x, 3)

        def lax_form(x: jax.Array, kernel: jax.Array) -> jax.Array:
            return lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=((1, 2), (1, 2)),
                lhs_dilation=(2, 2),
                dimension_numbers=_DIMENSION_NUMBERS,
                feature_group_count=self.groups,
            )

        return _by_impl(self.impl, lax_form, self._sub_pixel, x, kernel) + bias

    def _sub_pixel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The four output phases of the stride-2 transposed convolution (sub-pixel form).

        On the dilated input z (z[2m] = x[m], zeros between) padded by 1 before,
        out[p] = sum_t z[p + t - 1] K[t], so out[2i] = K[1] x[i] and
        out[2i+1] = K[0] x[i] + K[2] x[i+1] along each axis.
        """

        def tap(shifted: jax.Array, row: int, col: int) -> jax.Array:
            return _grouped_pointwise(shifted, kernel[row, col], self.groups)

        x_right = _shift_up_left(x, 0, 1)
        x_down = _shift_up_left(x, 1, 0)
        x_diag = _shift_up_left(x, 1, 1)
        even_even = tap(x, 1, 1)
        even_odd = tap(x, 1, 0) + tap(x_right, 1, 2)
        odd_even = tap(x, 0, 1) + tap(x_down, 2, 1)
        odd_odd = tap(x, 0, 0) + tap(x_right, 0, 2) + tap(x_down, 2, 0) + tap(x_diag, 2, 2)
        even_rows = jnp.stack([even_even, even_odd], axis=3)  # [B, H, W, 2, C]
        odd_rows = jnp.stack([odd_even, odd_odd], axis=3)
        phases = jnp.stack([even_rows, odd_rows], axis=2)  # [B, H, 2, W, 2, C]
        b, h, _, w, _, c = phases.shape
        return phases.reshape(b, 2 * h, 2 * w, c)


def _channel_mean(x: jax.Array) -> jax.Array:
    """Mean over N, H, W of ``[N, H, W, C]``: over the rows ``[N * H, W * C]`` first, then W.

    The same value as ``jnp.mean(x, axis=(0, 1, 2))``, but XLA:CPU vectorises a reduction over
    rows whose minor dimension is W * C wide, not one whose kept minor dimension is C (2 for
    CheapNet-S) (BENCHMARKS.md, "Layer forms").
    """
    _, _, width, channels = x.shape
    return jnp.mean(x.reshape(-1, width * channels), axis=0).reshape(width, channels).mean(0)


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W with PyTorch's semantics.

    Training normalises with the biased batch variance and updates ``var`` with the *unbiased*
    one, like `torch.nn.BatchNorm2d` (Flax's BatchNorm uses the biased one). With ``axis_name``
    the batch statistics are averaged across devices (cross-replica BatchNorm); the per-device
    batches must then all have the same size.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,)).astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,)).astype(x.dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if not train:
            mean = running_mean.value.astype(x.dtype)
            var = running_var.value.astype(x.dtype)
        else:
            mean, var = self._batch_moments(x)
            if not self.is_initializing():
                count = x.size // features
                if self.axis_name is not None:
                    count = count * lax.psum(1, self.axis_name)
                unbiased_var = var * count / max(count - 1, 1)
                m = self.momentum
                stats_dtype = running_mean.value.dtype
                running_mean.value = (m * running_mean.value + (1 - m) * mean).astype(stats_dtype)
                running_var.value = (m * running_var.value + (1 - m) * unbiased_var).astype(
                    stats_dtype
                )
        inv_std = lax.rsqrt(var + jnp.asarray(self.epsilon, x.dtype))
        return (x - mean) * (inv_std * scale) + bias

    def _batch_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = _channel_mean(x)
        if self.axis_name is not None:
            mean = lax.pmean(mean, self.axis_name)
        # Two passes (mean first, then squared deviations) rather than E[x^2] - E[x]^2.
        var = _channel_mean(jnp.square(x - mean))
        if self.axis_name is not None:
            var = lax.pmean(var, self.axis_name)
        return mean, var


def storage_offset(batch_norm_bias: jax.Array) -> jax.Array:
    """What a block subtracts from its output before storing it in a narrower dtype:
    leaky_relu(BatchNorm bias), the output at the channel's running mean.

    bfloat16 keeps 8 significant bits of a value, so a channel that sits far from 0 with little
    spread (the G = 2 bottleneck's second channel: mean 2.99, std 0.03, where bfloat16's step is
    0.016) loses its signal; of its deviation from this offset it keeps 8 bits.
    """
    return nn.leaky_relu(batch_norm_bias, LEAKY_SLOPE)


class ConvBlock(nn.Module):
    """conv (or transposed conv) -> BatchNorm -> LeakyReLU(0.2).

    Takes and returns an activation as stored between blocks, ``(values, offset)``: with
    ``storage_dtype`` None the output as computed and None; otherwise the output minus
    ``offset`` (per channel) as ``storage_dtype``. The input's values are its offset plus the
    stored ones.
    """

    features: int
    kind: Literal["conv", "transpose"] = "conv"
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    impl: Impl = "auto"
    bn_axis_name: str | None = None
    folded: bool = False
    storage_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, stored: tuple[jax.Array, jax.Array | None], train: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        x, x_offset = stored
        if x_offset is not None:
            x = x.astype(x_offset.dtype) + x_offset
        if self.kind == "transpose":
            y = ConvTranspose(self.features, self.groups, self.impl, name="conv")(x)
        else:
            y = Conv(
                self.features, self.kernel_size, self.stride, self.groups, self.impl, name="conv"
            )(x)
        if self.folded:
            # Set by `fold_batch_norm` from the BatchNorm it folded away.
            offset = self.param("storage_offset", nn.initializers.zeros, (self.features,))
        else:
            y = BatchNorm(axis_name=self.bn_axis_name, name="bn")(y, train)
        output = nn.leaky_relu(y, LEAKY_SLOPE)
        if self.storage_dtype is None:
            return output, None
        if not self.folded:
            offset = storage_offset(self.variables["params"]["bn"]["bias"])
        offset = offset.astype(output.dtype)
        return (output - offset).astype(self.storage_dtype), offset


def is_valid_size(height: int, width: int) -> bool:
    """Whether CheapNet takes an image of ``height`` x ``width``: positive multiples of 16."""
    return height > 0 and width > 0 and not height % SIZE_MULTIPLE and not width % SIZE_MULTIPLE


def check_input_shape(shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``shape`` is NHWC ``[B, H, W, 1]`` with H, W multiples of 16."""
    if len(shape) != 4 or shape[-1] != 1:
        raise ValueError(f"CheapNet takes NHWC input [B, H, W, 1], got shape {tuple(shape)}")
    _, height, width, _ = shape
    if not is_valid_size(height, width):
        raise ValueError(
            f"CheapNet needs H and W to be positive multiples of {SIZE_MULTIPLE} "
            f"(four stride-2 stages), got H={height}, W={width}: pad or crop the image"
        )


class CheapNet(nn.Module):
    """CheapNet of width ``features`` (G >= 1).

    ``apply(variables, x, train=False)`` with x float ``[B, H, W, 1]`` (already normalised,
    H and W multiples of 16) returns pre-sigmoid logits ``[B, H, W, 1]`` in x's dtype (each
    block computes in x's dtype, or float32 for bfloat16 x).
    ``bn_axis_name`` makes training-mode BatchNorm average its statistics over that pmap axis.
    ``folded=True`` is the inference-only form without BatchNorm layers, whose variables come
    from `fold_batch_norm`. ``activation_dtype=jnp.bfloat16`` stores the outputs of the blocks
    at full, 1/2 and 1/4 resolution (98.7% of the activation bytes) as bfloat16 between blocks,
    each block computing in float32 (see `ConvBlock`), relative to `storage_offset`.
    """

    features: int
    impl: Impl = "auto"
    bn_axis_name: str | None = None
    folded: bool = False
    activation_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.features < 1:
            raise ValueError(f"features (G) must be >= 1, got {self.features}")
        check_input_shape(x.shape)
        if self.folded and train:
            raise ValueError("a CheapNet with folded BatchNorm is for inference only")
        g = self.features
        input_dtype = x.dtype
        compute_dtype = jnp.promote_types(input_dtype, jnp.float32)
        storage_dtype = jnp.dtype(self.activation_dtype or input_dtype)
        if storage_dtype == compute_dtype:
            storage_dtype = None
        x = x.astype(compute_dtype)

        def block(name: str, **kwargs) -> ConvBlock:
            return ConvBlock(
                features=kwargs.pop("features", g),
                impl=self.impl,
                bn_axis_name=self.bn_axis_name,
                folded=self.folded,
                storage_dtype=kwargs.pop("storage_dtype", storage_dtype),
                name=name,
                **kwargs,
            )

        def concat(*stored: tuple[jax.Array, jax.Array | None]) -> tuple:
            # The skip connections: values and offsets side by side (the two halves are stored
            # alike: both at 1/8 of the resolution, or both finer).
            arrays, offsets = zip(*stored, strict=True)
            if offsets[0] is None:
                return jnp.concatenate(arrays, -1), None
            return jnp.concatenate(arrays, -1), jnp.concatenate(offsets, -1)

        # The outputs at 1/8 and 1/16 of the resolution stay in compute_dtype: 1.3% of the
        # activation bytes; stored as bfloat16 too, the G = 32 checkpoint's masks on the real
        # samples agreed with float32 on 99.989% of the pixels instead of 99.990% (BENCHMARKS.md).
        wide = {"storage_dtype": None}
        e1 = block("encoder1")((x, None), train)
        e2 = block("encoder2", stride=2, groups=g)(e1, train)
        e3 = block("encoder3", stride=2, groups=g)(e2, train)
        e4 = block("encoder4", stride=2, groups=g, **wide)(e3, train)
        b = block("bottleneck", stride=2, groups=g, **wide)(e4, train)
        d1 = block("decoder1", kind="transpose", groups=g, **wide)(b, train)
        d2 = block("decoder2", kind="transpose", groups=g)(concat(e4, d1), train)
        d3 = block("decoder3", kind="transpose", groups=g)(concat(e3, d2), train)
        d4 = block("decoder4", kind="transpose", groups=g)(concat(e2, d3), train)
        output = block("output", features=1, kernel_size=1, storage_dtype=None)
        logits, _ = output(concat(e1, d4), train)
        return logits.astype(input_dtype)


def receptive_field_radius() -> int:
    """How far an output pixel sees: logit ``[y, x]`` depends on input pixels within this many
    rows and columns of ``(y, x)`` and on no others (inference mode; tested against autodiff).

    Walked over the layers of `CheapNet.__call__` as intervals ``[lo, hi]`` of input offsets,
    relative to ``scale * position``, covered by one position of a feature map at ``scale``:
    a 3x3 conv (stride 1 or 2, padding 1) at input scale s widens the interval by s on each
    side; the stride-2 transposed conv back to scale s gives even outputs their input's interval
    and odd outputs the union of two neighbours', i.e. widened by s; a concatenation takes the
    union; the 1x1 output conv changes nothing. The radius is the same for every G.
    """

    def conv3x3(interval: tuple[int, int], in_scale: int) -> tuple[int, int]:
        return interval[0] - in_scale, interval[1] + in_scale

    def union(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return min(a[0], b[0]), max(a[1], b[1])

    e1 = conv3x3((0, 0), 1)  # scale 1
    e2 = conv3x3(e1, 1)  # scale 2
    e3 = conv3x3(e2, 2)  # scale 4
    e4 = conv3x3(e3, 4)  # scale 8
    bottleneck = conv3x3(e4, 8)  # scale 16
    d1 = conv3x3(bottleneck, 8)  # transposed, scale 16 -> 8
    d2 = conv3x3(union(e4, d1), 4)  # scale 8 -> 4
    d3 = conv3x3(union(e3, d2), 2)  # scale 4 -> 2
    d4 = conv3x3(union(e2, d3), 1)  # scale 2 -> 1
    low, high = union(e1, d4)  # the output block's 1x1 conv
    return max(-low, high)


def fold_batch_norm(variables: dict, epsilon: float = BN_EPSILON) -> dict:
    """Variables of ``CheapNet(G, folded=True)`` computing what ``variables`` compute in
    inference mode: each BatchNorm's ``(y - mean) * scale / sqrt(var + eps) + bias`` folded
    into its convolution (kernels scaled per output channel, the last HWIO axis, for plain
    and transposed convolutions alike; biases shifted), and the block's storage offset (see
    `ConvBlock`) kept. Computed in the variables' dtype."""
    folded = {}
    for name, block in variables["params"].items():
        stats = variables["batch_stats"][name]["bn"]
        bn = block["bn"]
        factor = bn["scale"] * lax.rsqrt(stats["var"] + jnp.asarray(epsilon, stats["var"].dtype))
        conv = block["conv"]
        folded[name] = {
            "conv": {
                "kernel": conv["kernel"] * factor,
                "bias": (conv["bias"] - stats["mean"]) * factor + bn["bias"],
            },
            "storage_offset": storage_offset(bn["bias"]),
        }
    return {"params": folded}


@functools.partial(jax.jit, static_argnames=("model", "image_size"))
def init_variables(model: CheapNet, rng: jax.Array, image_size: int = 16) -> dict:
    """Fresh variables (``params`` and ``batch_stats``) for ``model``.

    Jitted: eagerly, the forward pass that creates the variables is some 170 one-op programs,
    each compiled on its own (4.8 s against 1.2 s for CheapNet-S, measured); the values are
    the same bits."""
    dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    return dict(model.init(rng, dummy, train=False))


def inference_logits(model: CheapNet, variables: dict, x: jax.Array) -> jax.Array:
    """Inference-mode logits of a batch ``[B, H, W, 1]``, fastest form per backend.

    Lowered for the CPU, the images go through the network one at a time inside the compiled
    program (`lax.map`): XLA:CPU then reuses one image's temporary buffers instead of faulting in
    fresh pages for the whole batch (BENCHMARKS.md, "Layer forms"). Lowered for an accelerator,
    the batch runs at once. Inference BatchNorm is per image, so both are equal.
    """

    def whole_batch(x: jax.Array) -> jax.Array:
        return model.apply(variables, x, train=False)

    def one_at_a_time(x: jax.Array) -> jax.Array:
        return lax.map(lambda image: model.apply(variables, image[None], train=False)[0], x)

    if x.shape[0] == 1:
        return whole_batch(x)
    return lax.platform_dependent(x, cpu=one_at_a_time, default=whole_batch)
