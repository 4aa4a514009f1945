"""Several models of one width run as one: their weights stacked on a leading member axis and
a member index per image, so that images for different models (one per product or camera)
share a compiled call.

Each image goes through the network with its own member's weights and normalisation. On the
CPU the images of a batch already run one at a time inside the program (`inference_logits`):
here each runs its member's branch of the program, so an image's probabilities are bit for
bit those its member's own program computes (tested). On accelerators the batch runs at once,
vmapped over the images and their weights. Thresholds and minimum areas are per image
too (arrays, not compiled constants), so that members calibrated differently share a call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cheapnet_jax.detection import (
    INFERENCE_DTYPES,
    Detections,
    check_dtype,
    detections_from_probabilities,
    normalization_table,
)
from cheapnet_jax.model import CheapNet, fold_batch_norm

SWITCH_UP_TO = 16
"""Up to this many members of one width, the CPU program holds a branch per member (see
`member_probabilities`); beyond, one network whose weights are sliced per image (half the
speed on XLA:CPU, but one compilation whatever the number of members)."""


def stack_members(variables: Sequence[Mapping]) -> dict:
    """The members' variables (one tree each, the same shapes) stacked on a leading axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *variables)


def normalization_tables(normalizations: Sequence[tuple[float, float]]) -> np.ndarray:
    """float32 ``[M, 256]``: each member's `detection.normalization_table`."""
    return np.stack([normalization_table(mean, std) for mean, std in normalizations])


def member_probabilities(
    model: CheapNet,
    stacked: Mapping,
    tables: jax.Array,
    x: jax.Array,
    member: jax.Array,
    count: jax.Array | None = None,
    *,
    dtype: str = "float32",
    fold: bool = True,
) -> jax.Array:
    """Probabilities float32 ``[B, H, W]`` of uint8 pixels ``[B, H, W]``, image ``i`` through
    member ``member[i]``'s weights (``stacked``: variables with a leading member axis) and
    normalisation (``tables``: `normalization_tables`): `detection.network_probabilities` of
    each image with its member's variables. On the CPU only the first ``count`` images (a
    traced int32; None: all) go through the network, the others' probabilities are 0: one
    program serves every batch of 2 to B images (see `member_batch_sizes`)."""
    if fold and not model.folded:
        model, stacked = model.clone(folded=True), jax.vmap(fold_batch_norm)(stacked)
    model = model.clone(activation_dtype=INFERENCE_DTYPES[dtype])

    def logits_of(variables: Mapping, image: jax.Array) -> jax.Array:
        return model.apply(variables, image[None], train=False)[0]

    def normalized(pixels: jax.Array, index: jax.Array) -> jax.Array:
        # one image's pixels looked up in its member's table (a 1-d gather, as one model's
        # program does; a [B, H, W] gather with the member as a second coordinate took 86
        # against 77 ms for 8 images of 512x512 on AMD EPYC)
        return tables[index][pixels][..., None]

    def sliced(operands: tuple[jax.Array, jax.Array]) -> jax.Array:
        pixels, index = operands
        variables = jax.tree.map(lambda leaf: leaf[index], stacked)
        return logits_of(variables, normalized(pixels, index))

    members = jax.tree.leaves(stacked)[0].shape[0]
    if members <= SWITCH_UP_TO:
        # A branch per member, each with its weights fixed for the whole loop: XLA:CPU runs
        # it as fast as one model's program (33 against 36-42 ms for 8 images of 512x512,
        # CheapNet-S, AMD EPYC), where weights sliced by the image's index in the loop took
        # 76-78 ms. The cost: the network compiled once per member.
        branches = [
            functools.partial(logits_of, jax.tree.map(lambda leaf, i=i: leaf[i], stacked))
            for i in range(members)
        ]

        def one(operands: tuple[jax.Array, jax.Array]) -> jax.Array:
            pixels, index = operands
            return lax.switch(index, branches, normalized(pixels, index))

    else:
        one = sliced

    def first_ones(operands: tuple[jax.Array, jax.Array]) -> jax.Array:
        # A loop of a traced length: XLA:CPU cannot unroll it (it unrolled the short loops of
        # batches of 2 and 4, each with a branch per member: 100 MiB more code each for ten
        # CheapNet-S members).
        pixels, index = operands

        def body(i, logits):
            return logits.at[i].set(one((pixels[i], index[i])).astype(logits.dtype))

        logits = jnp.zeros((*pixels.shape, 1), jnp.float32)  # the normalised images' dtype
        return lax.fori_loop(0, pixels.shape[0] if count is None else count, body, logits)

    if x.shape[0] == 1:
        logits = one((x[0], member[0]))[None]
    else:
        logits = lax.platform_dependent(
            (x, member),
            cpu=first_ones,
            default=lambda operands: jax.vmap(lambda *pair: sliced(pair))(*operands),
        )
    return jax.nn.sigmoid(logits.astype(jnp.float32))[..., 0]


def member_batch_sizes(batch_size: int) -> list[int]:
    """The batch sizes a several-member program is compiled for: 1, and ``batch_size`` for
    every batch of 2 to ``batch_size`` images (padded; only the real ones computed)."""
    return sorted({1, batch_size})


def member_batch_size(count: int, batch_size: int) -> int:
    """The batch `member_batch_sizes` runs ``count`` images as."""
    return 1 if count == 1 else batch_size


def make_member_network(
    model: CheapNet, *, dtype: str = "float32", fold: bool = True
) -> Callable[..., jax.Array]:
    """A jitted ``(stacked, tables, x, member, count=None, crop=None) -> probabilities
    [B, H, W]`` (`member_probabilities`, the top-left ``crop=(height, width)`` kept)."""
    check_dtype(dtype)

    @functools.partial(jax.jit, static_argnames="crop")
    def probabilities_of(
        stacked, tables, x, member, count=None, crop: tuple[int, int] | None = None
    ):
        probabilities = member_probabilities(
            model, stacked, tables, x, member, count, dtype=dtype, fold=fold
        )
        return probabilities if crop is None else probabilities[:, : crop[0], : crop[1]]

    return probabilities_of


def make_member_detector(
    model: CheapNet, *, max_components: int = 256, dtype: str = "float32", fold: bool = True
) -> Callable[..., Detections]:
    """A jitted ``(stacked, tables, x, member, count, thresholds [B], min_areas [B], crop=None)
    -> Detections``: `make_member_network`'s probabilities, each image thresholded, labeled
    and measured with its own threshold and minimum area."""
    network = make_member_network(model, dtype=dtype, fold=fold)

    @functools.partial(jax.jit, static_argnames="crop")
    def detector(stacked, tables, x, member, count, thresholds, min_areas, crop=None) -> Detections:
        probabilities = network(stacked, tables, x, member, count, crop=crop)
        return detections_from_probabilities(
            probabilities,
            threshold=thresholds[:, None, None],
            max_components=max_components,
            min_area=min_areas[:, None],
        )

    return detector
