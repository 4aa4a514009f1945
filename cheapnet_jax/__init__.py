"""cheapnet-jax: CheapNet for defect segmentation and detection in JAX/Flax."""

import sys

# `python -m cheapnet_jax.<module>` imports this package first, with sys.argv[0] "-m" while
# the module is found: a library module is refused here in one line (exit 2) rather than
# imported and left to exit 0 having done nothing.
if sys.argv[:1] == ["-m"]:
    from cheapnet_jax.commands import library_module_run

    if (refusal := library_module_run(sys.orig_argv)) is not None:
        print(refusal, file=sys.stderr)
        sys.exit(2)

# First, before anything can start JAX's CPU backend: its threads must find glibc set to keep
# XLA's freed temporary buffers (see cheapnet_jax.host_allocator).
from cheapnet_jax.host_allocator import keep_freed_memory

HOST_ALLOCATOR = keep_freed_memory()
"""What `keep_freed_memory` did when cheapnet_jax was imported (benchmarks report it)."""

# ruff: noqa: E402
from cheapnet_jax.detection import Detections, detect, make_detector
from cheapnet_jax.errors import CheckpointError, DataError, UserError
from cheapnet_jax.inspection import Defect, Inspector, InspectorOptions, Result
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
    "Defect",
    "Detections",
    "Inspector",
    "InspectorOptions",
    "Result",
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
