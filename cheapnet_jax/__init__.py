"""cheapnet-jax: CheapNet for defect segmentation and detection in JAX/Flax."""

from cheapnet_jax.model import VARIANTS, CheapNet, param_count
from cheapnet_jax.torch_import import (
    CheckpointError,
    load_torch_checkpoint,
    save_torch_checkpoint,
)

__all__ = [
    "VARIANTS",
    "CheapNet",
    "CheckpointError",
    "load_torch_checkpoint",
    "param_count",
    "save_torch_checkpoint",
]
