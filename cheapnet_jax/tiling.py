"""Images of any size in tiles, exactly: the same probabilities and defects as whole-image
inference, in memory set by the tile size, also for line-scan strips that arrive in chunks.

Why it is exact. CheapNet's logit at ``(y, x)`` depends only on the input pixels within
`model.receptive_field_radius` (31) rows and columns of it, and its four stride-2 stages put
every feature map on a grid of 16 input pixels. A tile's core, ``tile x tile`` pixels at an
origin that is a multiple of 16, is computed on a crop that extends it by ``margin`` (the radius
rounded up to 16: 32) on every side, shifted inward (never shrunk) at the image's border, where
the crop's zero padding is the whole image's. Every core pixel then sees exactly the pixels and
the padding that it sees in the whole image, on the same grid, so its probability is the same.

The defects of the cores are then merged across the seams: each tile is labeled on the device
(`labeling.label_and_measure`), only its components' boxes, areas, probability sums and first
pixels and the labels on its core's four edges come back to the host, and a union-find over the
pairs of seam pixels that touch (8- or 4-connectivity) joins the parts of one defect. Tiles are
processed in rows from the top; a defect is emitted as soon as none of its parts touches the
last processed row, which no later row can then change (`StripDetector`, the line-scan API).
`detect_tiled` is the same over a whole image, and returns what `detection.make_detector` gives
for it: the first ``max_components`` defects in raster order of their first pixel, then those of
at least ``min_area`` pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cheapnet_jax.data import pad_axis_to_multiple
from cheapnet_jax.detection import INFERENCE_DTYPES, component_sums, network_probabilities
from cheapnet_jax.labeling import Method, component_segments, label_and_measure
from cheapnet_jax.model import SIZE_MULTIPLE, CheapNet, receptive_field_radius

DEFAULT_TILE = 1024
DEFAULT_MAX_PARTS = 16384  # per tile; a part is small (8 numbers), a cap only bounds memory


def tile_margin() -> int:
    """Context a tile's core needs on each side: the receptive field radius rounded up to 16."""
    return -(-receptive_field_radius() // SIZE_MULTIPLE) * SIZE_MULTIPLE


def check_tile(tile: int) -> int:
    """``tile`` if it is a positive multiple of 16, else ValueError."""
    if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
        raise ValueError(f"tile must be a positive multiple of {SIZE_MULTIPLE}, got {tile}")
    return tile


def crop_start(core_start: int, size: int, crop: int, margin: int) -> int:
    """Where the crop of a core starting at ``core_start`` begins along an axis of ``size``
    (padded) pixels: ``margin`` before the core, shifted inward so that it lies in the image."""
    return min(max(core_start - margin, 0), size - crop)


class Defect(NamedTuple):
    """One merged defect: inclusive box, area, mean probability, and its first pixel in raster
    order (``y * width + x``), the order of `detection` (labels are numbered by it)."""

    x1: int
    y1: int
    x2: int
    y2: int
    area: int
    score: float
    first: int


class TileResult(NamedTuple):
    """What comes back from one tile (K = max_parts), in the core's coordinates.

    stats: int32 [K, 5] ``[x1, y1, x2, y2, area]``; sums: float32 [K] probability sums;
    first: int32 [K] first pixel ``y * core_width + x``; count: components in the core;
    top, bottom: int32 [core_width] labels of the core's first and last valid row; left, right:
    int32 [core_height] of its first and last valid column; probabilities: float32 and mask:
    bool ``[core_height, core_width]``.
    """

    stats: jax.Array
    sums: jax.Array
    first: jax.Array
    count: jax.Array
    top: jax.Array
    bottom: jax.Array
    left: jax.Array
    right: jax.Array
    probabilities: jax.Array
    mask: jax.Array


def make_tile_detector(
    model: CheapNet,
    *,
    threshold: float = 0.5,
    max_parts: int = DEFAULT_MAX_PARTS,
    connectivity: int = 8,
    method: Method = "auto",
    dtype: str = "float32",
    normalization: tuple[float, float],
) -> Callable[..., TileResult]:
    """A jitted ``(variables, crop, offset, valid, core_shape) -> TileResult``.

    ``crop``: uint8 ``[Ch, Cw]`` (multiples of 16); ``offset``: int32 ``[2]`` where the core
    starts in the crop; ``valid``: int32 ``[2]``, the core's rows and columns that lie in the
    unpadded image; ``core_shape`` (static): the core's full size. One compiled program serves
    every tile of that crop and core shape. ``max_parts``: components measured per tile (the
    parts of defects, merged later); more are counted in `StripDetector.parts_left_out`.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")

    @functools.partial(jax.jit, static_argnames="core_shape")
    def tile_detector(
        variables: Mapping,
        crop: jax.Array,
        offset: jax.Array,
        valid: jax.Array,
        core_shape: tuple[int, int],
    ) -> TileResult:
        probabilities = network_probabilities(
            model, variables, crop[None], dtype=dtype, normalization=normalization
        )[0]
        # Padded so that a core running past the crop's end (the last row or column of tiles,
        # whose rows past ``valid`` are masked) is sliced where it is, not shifted back in.
        padded = jnp.pad(probabilities, ((0, core_shape[0]), (0, core_shape[1])))
        core = jax.lax.dynamic_slice(padded, (offset[0], offset[1]), core_shape)
        rows = jnp.arange(core_shape[0])[:, None]
        cols = jnp.arange(core_shape[1])[None, :]
        mask = (core > threshold) & (rows < valid[0]) & (cols < valid[1])
        labels, counts, (stats, _, _) = label_and_measure(
            mask[None], connectivity, max_parts, method=method
        )
        sums = component_sums(labels, core[None], max_parts, connectivity)[0]
        first = (
            jnp.full((max_parts,), core_shape[0] * core_shape[1], jnp.int32)
            .at[component_segments(labels, max_parts)]
            .min(jnp.arange(core.size, dtype=jnp.int32), mode="drop")
        )
        labels = labels[0]
        return TileResult(
            stats=stats[0],
            sums=sums,
            first=first,
            count=counts[0],
            top=labels[0],
            bottom=labels[valid[0] - 1],
            left=labels[:, 0],
            right=labels[:, valid[1] - 1],
            probabilities=core,
            mask=mask,
        )

    return tile_detector


class _Parts:
    """Union-find over the parts of defects seen so far, with each root's merged measures.

    A part is one component of one tile. Only parts of defects not yet emitted are kept.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        # root -> [x1, y1, x2, y2, area, probability sum, first pixel]
        self.measures: dict[int, list] = {}
        self.next_id = 0

    def add(self, measures: list) -> int:
        part = self.next_id
        self.next_id += 1
        self.parent[part] = part
        self.members[part] = [part]
        self.measures[part] = measures
        return part

    def find(self, part: int) -> int:
        root = part
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[part] != root:  # path compression
            self.parent[part], part = root, self.parent[part]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if len(self.members[root_a]) < len(self.members[root_b]):
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.members[root_a] += self.members.pop(root_b)
        kept, merged = self.measures[root_a], self.measures.pop(root_b)
        self.measures[root_a] = [
            min(kept[0], merged[0]),
            min(kept[1], merged[1]),
            max(kept[2], merged[2]),
            max(kept[3], merged[3]),
            kept[4] + merged[4],
            kept[5] + merged[5],
            min(kept[6], merged[6]),
        ]

    def emit_all_but(self, open_roots: set[int]) -> list[Defect]:
        """Remove and return the defects whose roots are not in ``open_roots``."""
        done = [root for root in self.measures if root not in open_roots]
        defects = []
        for root in done:
            x1, y1, x2, y2, area, total, first = self.measures.pop(root)
            defects.append(Defect(x1, y1, x2, y2, area, float(total / area), first))
            for part in self.members.pop(root):
                del self.parent[part]
        return sorted(defects, key=lambda d: d.first)


def _touching_pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs ``[n, 2]`` of part ids facing each other across a seam: ``a`` and ``b`` are the
    two lines of pixels along it (ids, -1 for background), ``a[i]`` touching ``b[i]`` and, for
    8-connectivity, ``b[i - 1]`` and ``b[i + 1]``."""
    pairs = [np.stack([a, b], axis=1)]
    if connectivity == 8:
        pairs.append(np.stack([a[:-1], b[1:]], axis=1))
        pairs.append(np.stack([a[1:], b[:-1]], axis=1))
    pairs = np.concatenate(pairs)
    pairs = pairs[(pairs[:, 0] >= 0) & (pairs[:, 1] >= 0)]
    return np.unique(pairs, axis=0)


class StripDetector:
    """Defects of an image that arrives in chunks of rows (a line-scan strip), as soon as they
    are final; the same defects as whole-image detection of the complete image.

        strip = StripDetector(tile_detector, variables, width=2048, tile=1024)
        for rows in camera:                     # uint8 [h, 2048], any h
            for defect in strip.push(rows):     # defects no later row can change
                ...
        for defect in strip.finish():           # the rest
            ...

    Memory holds at most ``2 * tile + 3 * margin`` rows of the strip (plus the last chunk) and
    the parts of the defects still open. Every
    emitted defect counts (no ``max_components`` cap over the strip; each tile still keeps at
    most ``max_parts`` components, and ``parts_left_out`` counts those a tile dropped:
    with any, the result may differ from whole-image detection). ``min_area`` is applied to
    the merged defects.
    """

    def __init__(
        self,
        tile_detector: Callable[..., TileResult],
        variables: Mapping,
        *,
        width: int,
        tile: int = DEFAULT_TILE,
        min_area: int = 0,
        connectivity: int = 8,
        keep_maps: bool = False,
    ) -> None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self._detect = tile_detector
        self._variables = variables
        self.width = width
        self.tile = check_tile(tile)
        self.margin = tile_margin()
        self.min_area = min_area
        self.connectivity = connectivity
        self.keep_maps = keep_maps
        self.parts_left_out = 0
        self.tiles = 0
        self._padded_width = width + (-width % SIZE_MULTIPLE)
        self._crop_width = min(self.tile + 2 * self.margin, self._padded_width)
        self._chunks: list[np.ndarray] = []  # rows from self._buffer_start on, width padded
        self._buffer_start = 0
        self._rows_seen = 0
        self._next_core = 0  # first row of the next row of tiles
        self._parts = _Parts()
        self._frontier: np.ndarray | None = None  # part ids of the last processed row
        self._maps: list[tuple[np.ndarray, np.ndarray]] = []
        self._finished = False

    def push(self, rows: np.ndarray) -> list[Defect]:
        """Add the next rows (uint8 ``[h, width]``); returns the defects they completed."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width or rows.dtype != np.uint8:
            raise ValueError(
                f"rows must be uint8 [h, {self.width}], got {rows.dtype} {list(rows.shape)}"
            )
        if rows.shape[0]:
            self._chunks.append(pad_axis_to_multiple(rows, axis=1))
            self._rows_seen += rows.shape[0]
        defects = []
        crop_height = self.tile + 2 * self.margin
        # A row of tiles is ready once its crop, not shifted at the bottom, has arrived: its
        # start is then known without the strip's height.
        while max(self._next_core - self.margin, 0) + crop_height <= self._rows_seen:
            defects += self._tile_row(self._rows_seen, crop_height, final=False)
        return defects

    def finish(self) -> list[Defect]:
        """End of the strip: the remaining rows of tiles and every open defect."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._rows_seen == 0:
            return []
        # The bottom padding, as `pad_axis_to_multiple` pads the whole image: it reads at most
        # the last 16 rows, which the buffer holds.
        self._chunks = [pad_axis_to_multiple(self._buffered_rows(), axis=0)]
        padded_height = self._rows_seen + (-self._rows_seen % SIZE_MULTIPLE)
        crop_height = min(self.tile + 2 * self.margin, padded_height)
        defects = []
        while self._next_core < padded_height:
            defects += self._tile_row(padded_height, crop_height, final=True)
        defects += self._emit(set())
        return sorted(defects, key=lambda d: d.first)

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """The probabilities float32 and mask bool ``[rows seen, width]`` of the rows of tiles
        done so far, with ``keep_maps=True`` (for tests and overlays: image-sized)."""
        if not self._maps:
            return np.zeros((0, self.width), np.float32), np.zeros((0, self.width), bool)
        probabilities, masks = zip(*self._maps, strict=True)
        return np.concatenate(probabilities), np.concatenate(masks)

    def _buffered_rows(self) -> np.ndarray:
        rows = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [rows]
        return rows

    def _tile_row(self, height: int, crop_height: int, final: bool) -> list[Defect]:
        """Detect one row of tiles, merge it with the rows above, emit the finished defects.

        ``height``: the strip's padded height when ``final``; the rows seen so far otherwise.
        """
        core_top = self._next_core
        core_height = min(self.tile, height) if final else self.tile
        top = crop_start(core_top, height, crop_height, self.margin)
        buffered = self._buffered_rows()
        crop_rows = buffered[top - self._buffer_start : top - self._buffer_start + crop_height]
        valid_rows = min(core_height, self._rows_seen - core_top)

        ids_top, ids_bottom, right_column = [], [], None
        row_maps = []
        for core_left in range(0, self._padded_width, self.tile):
            core_width = min(self.tile, self._padded_width)
            left = crop_start(core_left, self._padded_width, self._crop_width, self.margin)
            valid_cols = min(core_width, self.width - core_left)
            found = self._detect(
                self._variables,
                crop_rows[:, left : left + self._crop_width],
                np.array([core_top - top, core_left - left], np.int32),
                np.array([valid_rows, valid_cols], np.int32),
                core_shape=(core_height, core_width),
            )
            if not self.keep_maps:
                found = found._replace(probabilities=None, mask=None)
            found = jax.device_get(found)
            self.tiles += 1
            ids = self._add_parts(found, core_top, core_left, core_width)
            ids_top.append(ids[found.top][:valid_cols])
            ids_bottom.append(ids[found.bottom][:valid_cols])
            left_column = ids[found.left][:valid_rows]
            if right_column is not None:  # the vertical seam with the tile on the left
                self._join(_touching_pairs(right_column, left_column, self.connectivity))
            right_column = ids[found.right][:valid_rows]
            if self.keep_maps:
                row_maps.append(
                    (
                        found.probabilities[:valid_rows, :valid_cols],
                        found.mask[:valid_rows, :valid_cols],
                    )
                )

        top_line = np.concatenate(ids_top)
        if self._frontier is not None:  # the horizontal seam with the row of tiles above
            self._join(_touching_pairs(self._frontier, top_line, self.connectivity))
        self._frontier = np.concatenate(ids_bottom)
        if self.keep_maps:
            self._maps.append(
                tuple(np.concatenate([maps[i] for maps in row_maps], axis=1) for i in range(2))
            )
        self._next_core = core_top + core_height
        # Rows a later crop may still read: at most one crop height above the next core.
        keep_from = max(self._next_core - crop_height, 0)
        self._chunks = [buffered[keep_from - self._buffer_start :]]
        self._buffer_start = keep_from
        open_roots = {self._parts.find(int(p)) for p in np.unique(self._frontier) if p >= 0}
        return self._emit(open_roots)

    def _add_parts(self, found: TileResult, core_top: int, core_left: int, core_width: int):
        """Part ids of a tile's labels: ``ids[label]``, -1 for background and dropped ones."""
        count = int(found.count)
        kept = min(count, found.stats.shape[0])
        self.parts_left_out += count - kept
        ids = np.full(count + 1, -1, np.int64)
        for index in range(kept):
            x1, y1, x2, y2, area = (int(v) for v in found.stats[index])
            row, col = divmod(int(found.first[index]), core_width)
            first = (core_top + row) * self.width + core_left + col
            ids[index + 1] = self._parts.add(
                [
                    x1 + core_left,
                    y1 + core_top,
                    x2 + core_left,
                    y2 + core_top,
                    area,
                    float(found.sums[index]),
                    first,
                ]
            )
        return ids

    def _join(self, pairs: np.ndarray) -> None:
        for a, b in pairs:
            self._parts.union(int(a), int(b))

    def _emit(self, open_roots: set[int]) -> list[Defect]:
        return [d for d in self._parts.emit_all_but(open_roots) if d.area >= self.min_area]


class TiledDetections(NamedTuple):
    """`detect_tiled`'s result: ``defects`` in raster order of their first pixel (at most
    ``max_components``, then those of at least ``min_area`` pixels); ``overflow``: defects beyond
    ``max_components``; ``parts_left_out``: tile components beyond a tile's own cap; ``mask``:
    bool [H, W] and ``probabilities``: float32 [H, W] with ``keep_maps``, else None; ``tiles``:
    how many were run."""

    defects: list[Defect]
    overflow: int
    parts_left_out: int
    mask: np.ndarray | None
    probabilities: np.ndarray | None
    tiles: int


def detect_tiled(
    tile_detector: Callable[..., TileResult],
    variables: Mapping,
    image: np.ndarray,
    *,
    tile: int = DEFAULT_TILE,
    max_components: int = 256,
    min_area: int = 0,
    connectivity: int = 8,
    keep_maps: bool = False,
) -> TiledDetections:
    """Defects of one uint8 image ``[H, W]`` of any size, tile by tile; the defects that
    whole-image detection (`detection.make_detector` on the image padded as `predict.py` pads
    it, with the same settings) returns, with the same boxes and areas and scores equal up to
    the order of float32 summation."""
    strip = StripDetector(
        tile_detector,
        variables,
        width=image.shape[1],
        tile=tile,
        min_area=0,
        connectivity=connectivity,
        keep_maps=keep_maps,
    )
    defects = strip.push(image) + strip.finish()
    defects.sort(key=lambda d: d.first)
    overflow = max(len(defects) - max_components, 0)
    kept = [d for d in defects[:max_components] if d.area >= min_area]
    probabilities, mask = strip.maps() if keep_maps else (None, None)
    return TiledDetections(kept, overflow, strip.parts_left_out, mask, probabilities, strip.tiles)
