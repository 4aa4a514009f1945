"""Masks that break labeling shortcuts: long paths, combs, checkerboards, noise, odd sizes.

Used by tests/test_labeling.py and benchmarks/labeling.py.
"""

from __future__ import annotations

import numpy as np


def spiral(size: int) -> np.ndarray:
    """A one-pixel-wide square spiral with one-pixel gaps: a single, very long path."""
    mask = np.zeros((size, size), bool)
    directions = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    row, col, heading = 0, 0, 0
    mask[row, col] = True

    def free(r: int, c: int) -> bool:
        return 0 <= r < size and 0 <= c < size and not mask[r, c]

    def blocked_ahead(r: int, c: int) -> bool:
        return 0 <= r < size and 0 <= c < size and mask[r, c]

    while True:
        for _ in range(2):  # go straight, or turn clockwise once
            dr, dc = directions[heading]
            if free(row + dr, col + dc) and not blocked_ahead(row + 2 * dr, col + 2 * dc):
                row, col = row + dr, col + dc
                mask[row, col] = True
                break
            heading = (heading + 1) % 4
        else:
            return mask


def serpentine(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[::2] = True
    for row in range(1, height, 2):
        mask[row, width - 1 if (row // 2) % 2 == 0 else 0] = True
    return mask


def comb(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[-1] = True
    mask[:, ::2] = True
    return mask


def staircase(size: int) -> np.ndarray:
    """A two-pixel-thick anti-diagonal band: every row's run starts further left."""
    lower = np.tril(np.ones((size, size), bool))
    return (lower & ~np.tril(np.ones((size, size), bool), -2))[:, ::-1]


def shapes(noise_size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    checker = (np.add.outer(np.arange(32), np.arange(32)) % 2).astype(bool)
    diagonal = np.eye(40, dtype=bool) | np.fliplr(np.eye(40, dtype=bool))
    border = np.zeros((17, 23), bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    border[5:9, 5:9] = True
    found = {
        "spiral": spiral(64),
        "serpentine": serpentine(63, 50),
        "comb": comb(40, 61),
        "reverse_comb": comb(40, 61)[::-1],
        "checkerboard": checker,
        "diagonals": diagonal,
        "staircase": np.tril(np.ones((48, 48), bool))[:, ::-1]
        & ~np.tril(np.ones((48, 48), bool), -2)[:, ::-1],
        "border": border,
        "empty": np.zeros((16, 16), bool),
        "full": np.ones((16, 16), bool),
        "one_pixel": np.ones((1, 1), bool),
        "one_row": rng.random((1, 37)) < 0.5,
        "one_column": rng.random((29, 1)) < 0.5,
        "odd": rng.random((31, 45)) < 0.4,
    }
    for density in (0.05, 0.2, 0.4, 0.59, 0.7):
        found[f"noise_{density}"] = rng.random((noise_size, noise_size)) < density
    return found
