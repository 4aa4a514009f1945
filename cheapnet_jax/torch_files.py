"""Reading ``torch.save`` files of tensors without torch, and without running their pickle.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<name>/data.pkl`` pickles the saved
object, each tensor as a call of ``torch._utils._rebuild_tensor_v2`` on a storage that the
pickle names by a persistent id, and ``<name>/data/<key>`` holds that storage's raw bytes
(``<name>/byteorder`` says their byte order when not little-endian).

The unpickler here accepts what ``torch.load(weights_only=True)`` accepts for a state_dict
and nothing else: ordered dicts, the tensor rebuild and typed storages. Any other global the
pickle names (``os.system``, a class of the writer's code, ...) is refused before anything is
called, so a checkpoint never runs code. Tensors come back as numpy arrays.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import NamedTuple

import ml_dtypes
import numpy as np

from cheapnet_jax.errors import CheckpointError

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
"""torch's typed storages (the names its pickles use) and their element types."""


class _StorageType(NamedTuple):
    """Stands for a ``torch.<Name>Storage`` class in the pickle."""

    dtype: np.dtype


def _rebuild_tensor(
    storage: np.ndarray,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a view of ``storage`` (elements), copied."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor's storage is not a persistent storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in (*size, *stride)) or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride}")
    if all(size):  # its last element must lie inside the storage (as_strided does not check)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= len(storage):
            raise pickle.UnpicklingError(f"a tensor of size {size} beyond its storage")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
    )
    return np.array(view, copy=True)


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a state_dict of tensors and nothing else (see the module's text)."""

    def __init__(self, file, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
        super().__init__(file)
        self._read_storage = read_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"it names the global {module}.{name}; only tensors and ordered dicts are read"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"a storage of type {storage_type!r:.80}")
        return self._read_storage(str(key), storage_type.dtype, int(numel))


def read_torch_file(path: str | os.PathLike) -> object:
    """The object a ``torch.save`` zip file holds, its tensors as numpy arrays; CheckpointError
    naming the file for anything else (an older or damaged file, a pickle naming another
    global)."""
    name = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{name}: a zip file without one <name>/data.pkl")
            prefix = pickles[0][: -len("data.pkl")]
            entries = set(archive.namelist())
            byteorder = "little"
            if f"{prefix}byteorder" in entries:
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()

            def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
                member = f"{prefix}data/{key}"
                if member not in entries:
                    raise CheckpointError(f"{name}: storage {key!r} missing from the archive")
                raw = archive.read(member)
                if len(raw) < numel * dtype.itemsize:
                    raise CheckpointError(f"{name}: storage {key!r} is shorter than it says")
                order = "<" if byteorder == "little" else ">"
                stored = dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype
                return np.frombuffer(raw, stored, count=numel).astype(dtype)

            with archive.open(pickles[0]) as file:
                return _TensorUnpickler(file, read_storage).load()
    except CheckpointError:
        raise
    except zipfile.BadZipFile as err:
        raise CheckpointError(
            f"{name}: not a torch.save zip file ({err}): a checkpoint of PyTorch < 1.6 or "
            "another file; re-save it with torch.save in PyTorch >= 1.6"
        ) from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{name}: not a checkpoint of tensors ({type(err).__name__}: {err})"
        ) from err
