"""Choices that depend on where the program runs, decided per lowering platform.

``"auto"`` is not resolved by the process's default backend at trace time: a program traced on
a CPU host and exported for a GPU (`jax.export` with ``platforms=["cuda"]``) must carry the GPU
choice. `jax.lax.platform_dependent` traces both forms and keeps, when the program is lowered,
the one of the platform it is lowered for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from jax import lax


def check_choice(value: str, *, name: str, options: tuple[str, ...]) -> str:
    """``value`` if it is ``"auto"`` or one of ``options``; else ValueError naming ``name``."""
    if value != "auto" and value not in options:
        allowed = ", ".join(repr(option) for option in ("auto", *options))
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def per_platform(
    value: str,
    forms: Mapping[str, Callable],
    *operands,
    name: str,
    cpu: str,
    accelerator: str,
):
    """Apply ``forms[value]`` to ``operands``; for ``"auto"``, ``forms[cpu]`` where the program
    is lowered for the CPU and ``forms[accelerator]`` anywhere else."""
    check_choice(value, name=name, options=tuple(forms))
    if value != "auto":
        return forms[value](*operands)
    return lax.platform_dependent(*operands, cpu=forms[cpu], default=forms[accelerator])
