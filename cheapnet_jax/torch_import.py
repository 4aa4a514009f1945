"""The authors' PyTorch checkpoints <-> Flax variables.

The authors save ``torch.save({"CheapNet": model.state_dict()}, path)`` with tensors on
``cuda:0``. Keys are ``<block>.0.{weight,bias}`` (the convolution) and
``<block>.1.{weight,bias,running_mean,running_var,num_batches_tracked}`` (its BatchNorm2d).

Files are read without torch by `cheapnet_jax.torch_files` (the unpickling of
``torch.load(..., weights_only=True)``: tensors and ordered dicts only): a checkpoint is never
unpickled with arbitrary code execution. Writing them needs torch (the ``torch`` extra).
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax.errors import CheckpointError, MissingExtraError
from cheapnet_jax.files import write_atomic
from cheapnet_jax.model import CheapNet, Impl
from cheapnet_jax.torch_files import read_torch_file

CONV_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "bottleneck", "output")
TRANSPOSED_BLOCKS = ("decoder1", "decoder2", "decoder3", "decoder4")
BLOCKS = (*CONV_BLOCKS[:5], *TRANSPOSED_BLOCKS, "output")
STATE_DICT_KEY = "CheapNet"


def _import_torch():
    try:
        import torch
    except ImportError as err:  # depends on the install
        raise MissingExtraError(
            "writing PyTorch checkpoints needs torch: pip install 'cheapnet-jax[torch]'"
        ) from err
    return torch


def expected_torch_shapes(features: int) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of the authors' CheapNet of width G with its tensor shape."""
    g = features
    conv_weight = {
        "encoder1": (g, 1, 3, 3),
        "encoder2": (g, 1, 3, 3),
        "encoder3": (g, 1, 3, 3),
        "encoder4": (g, 1, 3, 3),
        "bottleneck": (g, 1, 3, 3),
        "decoder1": (g, 1, 3, 3),  # ConvTranspose2d: (Cin, Cout/groups, k, k)
        "decoder2": (2 * g, 1, 3, 3),
        "decoder3": (2 * g, 1, 3, 3),
        "decoder4": (2 * g, 1, 3, 3),
        "output": (1, 2 * g, 1, 1),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for block in BLOCKS:
        out = 1 if block == "output" else g
        shapes[f"{block}.0.weight"] = conv_weight[block]
        shapes[f"{block}.0.bias"] = (out,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{block}.1.{name}"] = (out,)
        shapes[f"{block}.1.num_batches_tracked"] = ()
    return shapes


def _transposed_torch_to_hwio(weight: np.ndarray, groups: int) -> np.ndarray:
    """ConvTranspose2d weight (Cin, Cout/G, k, k) -> HWIO kernel of the equivalent dilated conv."""
    cin, cout_per_group, kh, kw = weight.shape
    per_group = weight.reshape(groups, cin // groups, cout_per_group, kh, kw)
    swapped = per_group.transpose(0, 2, 1, 3, 4)
    oihw = swapped.reshape(groups * cout_per_group, cin // groups, kh, kw)
    return np.ascontiguousarray(oihw[:, :, ::-1, ::-1].transpose(2, 3, 1, 0))


def _hwio_to_transposed_torch(kernel: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of `_transposed_torch_to_hwio`."""
    kh, kw, cin_per_group, cout = kernel.shape
    oihw = kernel.transpose(3, 2, 0, 1)[:, :, ::-1, ::-1]
    per_group = oihw.reshape(groups, cout // groups, cin_per_group, kh, kw).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(per_group.reshape(groups * cin_per_group, cout // groups, kh, kw))


def _read_state_dict(path: str | os.PathLike) -> Mapping[str, object]:
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file", os.fspath(path))
    loaded = read_torch_file(path)
    if isinstance(loaded, Mapping) and STATE_DICT_KEY in loaded:
        loaded = loaded[STATE_DICT_KEY]
    if not isinstance(loaded, Mapping) or "encoder1.0.weight" not in loaded:
        found = list(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise CheckpointError(
            f"{os.fspath(path)}: not a CheapNet checkpoint: expected {{'CheapNet': state_dict}} "
            f"or a state_dict with 'encoder1.0.weight', found {found}"
        )
    return loaded


def _to_numpy_copy(value: object) -> np.ndarray:
    """A numpy copy: the Flax variables must not share memory with (mutable) torch tensors."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.array(value, copy=True)


def state_dict_to_variables(
    state_dict: Mapping[str, object], source: str = "state_dict", dtype=np.float32
) -> dict:
    """Convert a CheapNet state_dict (torch tensors or numpy arrays) into Flax variables.

    Raises CheckpointError naming every missing, unexpected or mis-shaped key. ``dtype`` is
    the dtype of the returned arrays (float64 needs ``jax_enable_x64``).
    """
    arrays = {key: _to_numpy_copy(value) for key, value in state_dict.items()}
    first = arrays.get("encoder1.0.weight")
    if first is None or first.ndim != 4:
        raise CheckpointError(f"{source}: 'encoder1.0.weight' missing or not a 4-d tensor")
    features = int(first.shape[0])
    expected = expected_torch_shapes(features)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit CheapNet(G={features}): missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {arrays[key].shape}, "
                f"CheapNet(G={features}) needs {shape}"
            )

    params: dict = {}
    batch_stats: dict = {}
    for block in BLOCKS:
        weight = arrays[f"{block}.0.weight"]
        if block in TRANSPOSED_BLOCKS:
            kernel = _transposed_torch_to_hwio(weight, groups=features)
        else:
            kernel = weight.transpose(2, 3, 1, 0)
        params[block] = {
            "conv": {"kernel": kernel, "bias": arrays[f"{block}.0.bias"]},
            "bn": {"scale": arrays[f"{block}.1.weight"], "bias": arrays[f"{block}.1.bias"]},
        }
        running = {"mean": f"{block}.1.running_mean", "var": f"{block}.1.running_var"}
        batch_stats[block] = {"bn": {name: arrays[key] for name, key in running.items()}}
    variables = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda array: jnp.asarray(array, dtype), variables)


def features_of(variables: Mapping) -> int:
    """The width G of CheapNet variables."""
    return int(variables["params"]["encoder1"]["conv"]["kernel"].shape[-1])


def load_torch_checkpoint(path: str | os.PathLike, *, impl: Impl = "auto") -> tuple[CheapNet, dict]:
    """Read an authors' checkpoint as ``(CheapNet(features=G), variables)``, G from the file."""
    variables = state_dict_to_variables(_read_state_dict(path), source=os.fspath(path))
    return CheapNet(features=features_of(variables), impl=impl), variables


def variables_to_numpy_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """Flax CheapNet variables -> the authors' tensors (float32 numpy, PyTorch layouts),
    without ``num_batches_tracked``."""
    features = features_of(variables)
    params, stats = variables["params"], variables["batch_stats"]
    state: dict[str, np.ndarray] = {}
    for block in BLOCKS:
        kernel = np.asarray(params[block]["conv"]["kernel"], np.float32)
        if block in TRANSPOSED_BLOCKS:
            weight = _hwio_to_transposed_torch(kernel, groups=features)
        else:
            weight = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        entries = {
            "0.weight": weight,
            "0.bias": params[block]["conv"]["bias"],
            "1.weight": params[block]["bn"]["scale"],
            "1.bias": params[block]["bn"]["bias"],
            "1.running_mean": stats[block]["bn"]["mean"],
            "1.running_var": stats[block]["bn"]["var"],
        }
        for name, value in entries.items():
            state[f"{block}.{name}"] = np.array(value, np.float32)
    return state


def variables_to_state_dict(variables: Mapping) -> dict:
    """Flax CheapNet variables -> the authors' state_dict (torch float32 tensors)."""
    torch = _import_torch()
    state = {
        key: torch.from_numpy(value)
        for key, value in variables_to_numpy_state_dict(variables).items()
    }
    for block in BLOCKS:
        state[f"{block}.1.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return state


def save_torch_checkpoint(variables: Mapping, path: str | os.PathLike) -> None:
    """Write ``{"CheapNet": state_dict}`` that the authors' PyTorch code loads."""
    torch = _import_torch()
    buffer = io.BytesIO()
    torch.save({STATE_DICT_KEY: variables_to_state_dict(variables)}, buffer)
    write_atomic(path, buffer.getvalue())
