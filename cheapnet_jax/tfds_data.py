"""A prepared tensorflow-datasets dataset as training and evaluation data: ``--data
tfds:dagm2007/class6`` (any config; ``tfds:dagm2007/class6:dagm_test`` names a split).

Read with `tfds.data_source` (array_record, random access, no TensorFlow) from ``$TFDS_DATA_DIR``
(TFDS's own variable; default ``~/tensorflow_datasets``), where ``python -m
datasets.dagm2007.build`` prepares it. Examples are read when asked for (`RecordSplit`): a
training process reads only the examples of its share of each global batch
(`data.host_share`), and the normalisation statistics are summed over each process's share of
the training split, then combined across processes.

Splits of the DAGM builder: ``train`` / ``validation`` (the paper's protocol) and ``dagm_train``
/ ``dagm_test`` (DAGM's own folders, good images included); the dagm protocol trains on
``dagm_train`` split 8:2 by the seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from cheapnet_jax.errors import DataError

PREFIX = "tfds:"


def is_tfds(source: str) -> bool:
    """Whether a ``--data`` value names a TFDS dataset."""
    return str(source).startswith(PREFIX)


def parse(source: str) -> tuple[str, str | None]:
    """``tfds:NAME/CONFIG[:SPLIT]`` -> ``("NAME/CONFIG", SPLIT or None)``."""
    name, _, split = source[len(PREFIX) :].partition(":")
    if not name:
        raise DataError(f"{source}: expected tfds:NAME/CONFIG[:SPLIT], e.g. tfds:dagm2007/class6")
    return name, split or None


class Example(NamedTuple):
    """What evaluation needs to know of an example besides its pixels."""

    class_id: int
    name: str


class RecordSplit:
    """Examples of a split, read on demand: ``images[indices]``, ``masks[indices]`` (uint8 and
    bool ``[len(indices), H, W]``); ``indices`` selects a subset of the split. The last batch
    read is kept, so that ``images[i]`` then ``masks[i]`` decode each example once."""

    def __init__(self, source: Sequence, indices: np.ndarray | None = None, name: str = ""):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)
        self.name = name
        self.images = _Field(self, 0)
        self.masks = _Field(self, 1)
        self._last: tuple[tuple[int, ...], tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: np.ndarray) -> RecordSplit:
        return RecordSplit(self.source, self.indices[positions], self.name)

    def read(self, positions) -> tuple[np.ndarray, np.ndarray, list[Example]]:
        """Images, masks and `Example` s at ``positions`` (of this split), each example read
        from the source once."""
        key = tuple(np.atleast_1d(np.asarray(positions)).tolist())
        if self._last is None or self._last[0] != key:
            examples = [self.source[int(self.indices[p])] for p in key]
            images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
            masks = np.stack([np.asarray(e["mask"]) > 0 for e in examples])
            about = [Example(int(e["class_id"]), _text(e["file_name"])) for e in examples]
            self._last = key, (images, masks, about)
        return self._last[1]

    def batches(self, batch_size: int) -> Iterator[tuple[list[Example], np.ndarray, np.ndarray]]:
        """``(examples, images, masks)`` of consecutive batches, like `data.iterate_batches`."""
        for start in range(0, len(self), batch_size):
            images, masks, about = self.read(range(start, min(start + batch_size, len(self))))
            yield about, images, masks


class _Field:
    def __init__(self, split: RecordSplit, which: int):
        self.split, self.which = split, which

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, positions) -> np.ndarray:
        return self.split.read(positions)[self.which]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_split(name: str, split: str) -> RecordSplit:
    """A prepared split (DataError naming the dataset, split and data dir when it is not)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            f"tfds:{name} needs tensorflow-datasets: pip install 'cheapnet-jax[tfds]'"
        ) from err
    data_dir = os.environ.get("TFDS_DATA_DIR")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (
        tfds.core.registered.DatasetNotFoundError,
        AssertionError,
        NotImplementedError,  # a registered builder whose data is not prepared here
        ValueError,
        OSError,
    ) as err:
        where = data_dir or "~/tensorflow_datasets"
        raise DataError(
            f"tfds:{name}:{split}: not prepared in {where} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); build it with python -m "
            "datasets.dagm2007.build, or set TFDS_DATA_DIR"
        ) from err
    return RecordSplit(source, name=f"tfds:{name}:{split}")


def training_splits(source: str, protocol: str, seed: int) -> tuple[RecordSplit, RecordSplit]:
    """Train and validation of ``tfds:NAME/CONFIG``: the dataset's ``train`` / ``validation``
    (paper protocol), or its ``dagm_train`` split 8:2 by ``seed`` (dagm protocol)."""
    name, split = parse(source)
    if split is not None:
        raise DataError(f"{source}: training picks the splits by --protocol; drop ':{split}'")
    if protocol == "paper":
        return open_split(name, "train"), open_split(name, "validation")
    whole = open_split(name, "dagm_train")
    order = np.random.default_rng([seed, 0]).permutation(len(whole))
    cut = min(max(round(0.8 * len(whole)), 1), len(whole) - 1)
    return whole.subset(np.sort(order[:cut])), whole.subset(np.sort(order[cut:]))


def evaluation_split(source: str) -> RecordSplit:
    """``tfds:NAME/CONFIG[:SPLIT]`` for evaluation; the split defaults to ``validation``."""
    name, split = parse(source)
    return open_split(name, split or "validation")


def partial_sums(split: RecordSplit, positions: np.ndarray, chunk: int = 32) -> np.ndarray:
    """``[sum, sum of squares, count]`` of pixel/255 over the images at ``positions``
    (float64), read ``chunk`` at a time."""
    sums = np.zeros(3)
    for start in range(0, len(positions), chunk):
        scaled = split.images[positions[start : start + chunk]].astype(np.float64) / 255.0
        sums += [scaled.sum(), np.square(scaled).sum(), scaled.size]
    return sums


def normalization_statistics(split: RecordSplit) -> tuple[float, float]:
    """Mean and standard deviation of pixel/255 over the whole split, each process reading
    only its share of the examples (sums combined across processes)."""
    import jax

    share = np.array_split(np.arange(len(split)), jax.process_count())[jax.process_index()]
    sums = partial_sums(split, share)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # float64 through float32 collectives (JAX's default): as a float32 head and the
        # float32 rest, which together keep about 48 bits
        head = sums.astype(np.float32)
        rest = (sums - head.astype(np.float64)).astype(np.float32)
        gathered = np.asarray(multihost_utils.process_allgather(np.stack([head, rest])))
        sums = gathered.astype(np.float64).sum(axis=(0, 1))
    mean = sums[0] / sums[2]
    return float(mean), float(np.sqrt(max(sums[1] / sums[2] - mean**2, 0.0)))
