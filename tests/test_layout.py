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


def module_imports(path) -> set[str]:
    """The cheapnet_jax modules a file imports at module level (not under ``__main__``)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # top level only: lazy imports inside functions do not count
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cheapnet"):
            base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                module_file = REPO_ROOT / (candidate.replace(".", "/") + ".py")
                package = REPO_ROOT / candidate.replace(".", "/") / "__init__.py"
                found.add(candidate if module_file.exists() or package.exists() else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cheapnet")}
    return found


def test_the_package_has_no_import_circle():
    files = {
        str(path.relative_to(REPO_ROOT).with_suffix("")).replace("/", "."): path
        for path in (REPO_ROOT / "cheapnet_jax").rglob("*.py")
    }
    graph = {
        name.removesuffix(".__init__"): module_imports(path) - {"cheapnet_jax"}
        for name, path in files.items()
    }
    assert "cheapnet_jax.cli.train" in graph and "cheapnet_jax.training" in graph
    assert "cheapnet_jax.training" in graph["cheapnet_jax.cli.train"]

    def visit(node, stack):
        if node in stack:
            raise AssertionError(" -> ".join([*stack[stack.index(node) :], node]))
        for child in graph.get(node, ()):
            visit(child, [*stack, node])

    for module in graph:
        visit(module, [])


def test_no_library_module_names_the_command_line():
    """The library never imports `cheapnet_jax.cli`, not even under ``__main__`` (``python -m``
    has its entries in the CLI package, and a package's ``__main__.py``)."""
    import ast

    offenders = []
    for path in (REPO_ROOT / "cheapnet_jax").rglob("*.py"):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[1] == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n == "cheapnet_jax.cli" or n.startswith("cheapnet_jax.cli.") for n in names):
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders, offenders
