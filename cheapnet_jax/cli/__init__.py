"""What the command-line tools share: a user's mistake is one line on stderr, not a traceback.

    sys.exit(cli.run(main, sys.argv[1:]))

A `UserError` (bad data, a checkpoint that does not fit, settings that cannot work, a diverged
run, a folder in use) and an operating-system error on a path (a missing file, a read-only
folder, a full disk: ``OSError`` with its file name) print ``error: <message>`` (the message
names the file or flag) and exit with status 1. Anything else keeps its traceback: it is a
bug, not a user's mistake. Set ``CHEAPNET_TRACEBACK=1`` to see the traceback of a user error
too.

The argparse types below check a flag's value where it is parsed, so that argparse's own
message names the flag and the accepted range.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from cheapnet_jax.errors import SettingsError, UserError


def run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)``'s exit status; 1, with the message on stderr, for a user error."""
    try:
        return main(argv)
    except OSError as err:
        if err.filename is None or os.environ.get("CHEAPNET_TRACEBACK"):
            raise
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
        print(f"error: {target}: {err.strerror or err}", file=sys.stderr)
        return 1
    except UserError as err:
        if os.environ.get("CHEAPNET_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def add_calibrated_settings(add: Callable, threshold: float, min_area: int) -> None:
    """``--threshold``, ``--min-area`` (None: resolved by `Inspector.load`) and
    ``--no-calibration``, with ``add`` a parser's or a group's ``add_argument``."""
    add(
        "--threshold",
        type=probability,
        help="a pixel is a defect if its probability > this (none: the checkpoint's "
        f"calibration, else {threshold})",
    )
    add(
        "--min-area",
        type=non_negative,
        help="drop smaller defects, in pixels (none: the checkpoint's calibration, else "
        f"{min_area})",
    )
    add(
        "--no-calibration",
        dest="use_calibration",
        action="store_false",
        help="ignore the checkpoint's calibration (evaluate.py --calibrate)",
    )


def load_inspector(args: argparse.Namespace):
    """The `Inspector` of ``args.checkpoint`` with the flags' settings (``threshold``,
    ``min_area``, ``normalization``, ``use_calibration``, ``impl``) and options (every field of
    `InspectorOptions` that ``args`` holds)."""
    import dataclasses

    from cheapnet_jax.inspection import Inspector, InspectorOptions

    fields = [f.name for f in dataclasses.fields(InspectorOptions)]
    settings = dict(
        threshold=args.threshold,
        min_area=args.min_area,
        normalization=args.normalization,
        calibration=args.use_calibration,
        impl=args.impl,
        **{name: getattr(args, name) for name in fields if hasattr(args, name)},
    )
    if getattr(args, "model", None):
        settings["model"] = args.model  # one member of a population
    if getattr(args, "models", None):
        names = [name for name, _ in args.models]
        if len(set(names)) != len(names):
            raise SettingsError(f"--model: a name given twice ({', '.join(names)})")
        return Inspector.load_models(dict(args.models), **settings)
    return Inspector.load(args.checkpoint, **settings)


def settings_line(inspector) -> str:
    """``using threshold 0.5 (default), min area 12 (calibration runs/x/calibration.json)``:
    the inspector's detection settings and where each came from, in the flags' words."""
    from cheapnet_jax.checkpoints import calibration_path

    flags = {"threshold": "--threshold", "min_area": "--min-area"}
    origins = []
    for name in flags:
        setting = inspector.settings[name]
        origin = {
            "given": flags[name],
            "calibration": f"calibration {calibration_path(inspector.checkpoint)}",
        }.get(setting.origin, setting.origin)
        origins.append(f"{name.replace('_', ' ')} {setting.value} ({origin})")
    return "using " + ", ".join(origins)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except a switch's: ``--no-overlays  skip the overlay
    PNGs (default: True)`` reads as if overlays were off by default (the True is the value of
    ``overlays``, the flag's destination, when the switch is not given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        is_switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        # an empty default (no classes, no paths) says nothing the help does not
        is_empty = action.default in ((), [], "", None)
        return action.help if is_switch or is_empty else super()._get_help_string(action)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser whose help shows every flag's default (a switch's is not given)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_DefaultsHelpFormatter
    )


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def finite(text: str) -> float:
    """A finite number."""
    return _number(text)


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def probability(text: str) -> float:
    """A probability threshold strictly between 0 and 1 (0 marks every pixel, 1 none)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1)")
    return value


def rate(text: str) -> float:
    """A rate between 0 and 1, both included."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in [0, 1]")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def image_size(text: str) -> int:
    """An image side: a positive multiple of 16 (CheapNet's four stride-2 stages)."""
    value = _integer(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive multiple of 16")
    return value


def image_shape(text: str) -> tuple[int, int]:
    """``N`` (square) or ``HxW``: positive image sides, any size."""
    parts = text.lower().split("x")
    try:
        if len(parts) > 2:
            raise argparse.ArgumentTypeError("more than two sides")
        sides = tuple(count(part) for part in parts)
    except argparse.ArgumentTypeError:  # named whole: '12x', not the empty side after the x
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected N or HxW of integers >= 1, such as 512 or 500x450"
        ) from None
    return (sides[0], sides[0]) if len(sides) == 1 else sides


def counts(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1 (``1,64,256``)."""
    return tuple(count(part) for part in text.split(",") if part.strip())


def increasing_counts(text: str) -> tuple[int, ...]:
    """Comma-separated increasing integers >= 1 (``60,90``); empty for none."""
    values = tuple(_integer(part) for part in text.split(",") if part.strip())
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r}: must be increasing integers >= 1")
    return values


def _is_name(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "-_." for c in text)


def dagm_classes(text: str) -> tuple[int, ...]:
    """``all`` or comma-separated DAGM class numbers 1..10."""
    if text == "all":
        return tuple(range(1, 11))
    try:
        classes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected '6', '1,2,3' or 'all'") from None
    if not classes or any(not 1 <= c <= 10 for c in classes):
        raise argparse.ArgumentTypeError(f"{text!r}: DAGM classes are 1..10")
    return classes


def class_names(text: str) -> tuple[str, ...]:
    """``--defect-classes scratch,dent``: class names of an annotated layout, comma-separated."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected class names separated by commas")
    return names


def named_path(text: str) -> tuple[str, str]:
    """``NAME=PATH``: a name (letters, digits, ``-``, ``_``, ``.``) and a path."""
    name, sep, path = text.partition("=")
    if not sep or not path or not _is_name(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=PATH, NAME of letters, digits, '-', '_' or '.'"
        )
    return name, path


def routed_folder(text: str) -> tuple[str, str]:
    """``FOLDER=NAME``: a folder and a model's name."""
    folder, sep, name = text.rpartition("=")
    if not sep or not folder or not _is_name(name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected FOLDER=NAME, NAME of letters, digits, '-', '_' or '.'"
        )
    return folder, name


def normalization(text: str) -> tuple[float, float]:
    """``mean,std`` of pixel/255: two finite numbers, std > 0."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected mean,std such as 0.348,0.278")
    return finite(parts[0]), positive(parts[1])
