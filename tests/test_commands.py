"""The command-line doors: every ``python -m`` spelling runs a command or refuses in one line
(none is a silent exit 0), and the help of a switch does not read as its opposite."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import pytest
from conftest import run_tool

import cheapnet_jax
from cheapnet_jax.commands import COMMANDS, library_module_run

RUNNABLE = {f"cheapnet_jax.cli.{name}" for name in COMMANDS} | {"cheapnet_jax.serve"}


def every_module() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(cheapnet_jax.__path__, "cheapnet_jax.")
        if not info.name.endswith("__main__")
    )


def test_every_library_module_is_refused_and_every_command_runs():
    """Decided for every module of the package: a command's is left to run, any other gets
    one line naming the commands (the module a command lives beside names its command)."""
    modules = every_module()
    assert {"cheapnet_jax.inspection", "cheapnet_jax.export", *RUNNABLE} <= {*modules}
    for module in modules:
        for argv in (["python", "-m", module, "--help"], ["python3", f"-m{module}"]):
            refusal = library_module_run(argv)
            if module in RUNNABLE:
                assert refusal is None, module
            else:
                assert refusal.startswith(f"error: python -m {module}: a library module"), module
                assert "\n" not in refusal and "cheapnet-" in refusal
    named = library_module_run(["python", "-m", "cheapnet_jax.export"])
    assert "run cheapnet-export (or python -m cheapnet_jax.cli.export)" in named
    # not a module run, or another package's: nothing to say
    assert library_module_run(["python", "train.py", "-m", "cheapnet_jax.model"]) is None
    assert library_module_run(["python", "-c", "pass", "-m", "cheapnet_jax.model"]) is None
    assert library_module_run(["python", "-X", "dev", "-m", "pytest"]) is None


def test_python_m_spellings_as_a_script_uses_them(tmp_path):
    """The README's old spelling of the export writes nothing and says so (exit 2), instead
    of exiting 0; each command module runs its command."""
    out = tmp_path / "m.onnx"
    old = run_tool(
        "-m cheapnet_jax.export", "--checkpoint", "x.pkl", "--format", "onnx", "--out", str(out)
    )
    assert old.returncode == 2 and not out.exists()
    assert old.stderr.strip() == (
        "error: python -m cheapnet_jax.export: a library module, not a command; run "
        "cheapnet-export (or python -m cheapnet_jax.cli.export)"
    )
    assert run_tool("-m cheapnet_jax.synthetic").returncode == 2
    for name in COMMANDS:
        shown = run_tool(f"-m cheapnet_jax.cli.{name}", "--help")
        assert shown.returncode == 0 and shown.stdout.startswith("usage: "), name


@pytest.mark.parametrize("name", COMMANDS)
def test_a_switch_s_help_does_not_show_its_destination_s_default(name):
    """``--no-overlays  skip the overlay PNGs (default: True)`` read as "off by default": a
    switch's help has no default; a flag with a value keeps its own."""
    parser = importlib.import_module(f"cheapnet_jax.cli.{name}").build_parser()
    formatter = parser._get_formatter()
    switches = 0
    for action in parser._actions:
        help_string = formatter._get_help_string(action) or ""
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            switches += 1
            assert "%(default)" not in help_string, action.option_strings
        elif action.help and action.default not in (None, argparse.SUPPRESS, (), [], ""):
            assert "%(default)" in help_string, action.option_strings
    assert switches >= 1
    if name == "predict":
        text = parser.format_help()
        assert "skip the overlay PNGs\n" in text and "(default: True)" not in text
