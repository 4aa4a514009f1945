"""The commands, and what ``python -m`` does with a module that is not one.

`cheapnet_jax/__init__.py` uses it before anything else is imported: ``python -m
cheapnet_jax.<a library module>`` would import the module and exit 0 having done nothing,
which a script would take for success.
"""

from __future__ import annotations

COMMANDS = ("train", "evaluate", "predict", "export", "serve", "synthetic", "data")
"""The commands: ``cheapnet-NAME``, also ``python -m cheapnet_jax.cli.NAME``."""

_COMMAND_OF_MODULE = {
    "cheapnet_jax.training": "train",
    "cheapnet_jax.evaluation": "evaluate",
    "cheapnet_jax.prediction": "predict",
    "cheapnet_jax.export": "export",
    "cheapnet_jax.synthetic": "synthetic",
    "cheapnet_jax.data_check": "data",
    "cheapnet_jax.layouts": "data",
    "cheapnet_jax.serve.app": "serve",
}


def library_module_run(orig_argv: list[str]) -> str | None:
    """The one-line refusal of ``python -m cheapnet_jax.<a library module>`` in ``orig_argv``
    (`sys.orig_argv`), None for any other command line. Such a module only defines things:
    run, it would import and exit 0 having done nothing, which a script would take for
    success."""
    for index, arg in enumerate(orig_argv[1:], 1):
        if arg == "-m" or (arg.startswith("-m") and len(arg) > 2):
            module = orig_argv[index + 1] if arg == "-m" and index + 1 < len(orig_argv) else ""
            module = module or arg[2:]
            break
        if not arg.startswith("-") or arg == "-c":
            return None  # a script or -c: not a module run
    else:
        return None
    runnable = {f"cheapnet_jax.cli.{name}" for name in COMMANDS} | {"cheapnet_jax.serve"}
    if not module.startswith("cheapnet_jax.") or module in runnable:
        return None
    command = _COMMAND_OF_MODULE.get(module)
    if command is not None:
        return (
            f"error: python -m {module}: a library module, not a command; run "
            f"cheapnet-{command} (or python -m cheapnet_jax.cli.{command})"
        )
    names = ", ".join(f"cheapnet-{name}" for name in COMMANDS)
    return (
        f"error: python -m {module}: a library module, not a command; the commands are "
        f"{names} (or python -m cheapnet_jax.cli.NAME)"
    )
