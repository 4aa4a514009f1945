"""The modules' imports run one way: reading a checkpoint, evaluating, predicting or exporting
never loads the trainer, and nothing imports a command-line script."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT, cli_env


@pytest.mark.parametrize(
    "module",
    [
        "cheapnet_jax.checkpoints",
        "cheapnet_jax.evaluation",
        "cheapnet_jax.prediction",
        "cheapnet_jax.export",
        "cheapnet_jax.cli",
        "cheapnet_jax.synthetic",
    ],
)
def test_inference_modules_do_not_load_the_trainer(module):
    check = (
        f"import sys, {module}; "
        "loaded = [m for m in ('cheapnet_jax.training', 'optax', 'tensorboardX') "
        "if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, f"{module} loads {result.stdout.strip()} {result.stderr}"
