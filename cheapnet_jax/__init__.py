"""cheapnet-jax: CheapNet for defect segmentation and detection in JAX/Flax."""

from cheapnet_jax.detection import Detections, detect, make_detector
from cheapnet_jax.errors import CheckpointError, DataError, UserError
from cheapnet_jax.labeling import (
    ComponentStats,
    component_stats,
    label_and_measure,
    label_components,
)
from cheapnet_jax.model import VARIANTS, CheapNet, param_count
from cheapnet_jax.tiling import StripDetector, detect_tiled, make_tile_detector
from cheapnet_jax.torch_import import load_torch_checkpoint, save_torch_checkpoint

__all__ = [
    "VARIANTS",
    "CheapNet",
    "CheckpointError",
    "ComponentStats",
    "DataError",
    "Detections",
    "StripDetector",
    "UserError",
    "component_stats",
    "detect",
    "detect_tiled",
    "label_and_measure",
    "label_components",
    "load_torch_checkpoint",
    "make_detector",
    "make_tile_detector",
    "param_count",
    "save_torch_checkpoint",
]
