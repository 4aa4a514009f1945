"""Choices that depend on where the program runs: ``"auto"`` resolved by the default backend."""

from __future__ import annotations

import jax


def resolve_auto(value: str, *, name: str, cpu: str, accelerator: str, options: tuple) -> str:
    """``value``, or for ``"auto"`` the ``cpu`` or ``accelerator`` choice by the default backend;
    ValueError naming ``name`` for anything outside ``options``."""
    if value == "auto":
        return cpu if jax.default_backend() == "cpu" else accelerator
    if value not in options:
        allowed = ", ".join(repr(option) for option in ("auto", *options))
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
