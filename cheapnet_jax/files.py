"""Writing results safely: whole files or nothing, and one run per output folder at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cheapnet_jax.errors import FolderInUseError

LOCK_FILE = ".lock"


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Write ``content`` to ``path`` whole or not at all: a temporary file in the same folder,
    flushed to disk, then renamed over ``path`` (a crash leaves the old file, never half)."""
    path = Path(path)
    mode = "wb" if isinstance(content, bytes) else "w"
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        # surrogateescape: file names that are not valid UTF-8 are written back byte for byte.
        encoding = {} if mode == "wb" else {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(descriptor, mode, **encoding) as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold ``folder/.lock`` while the block runs; FolderInUseError if another process holds it.

    An advisory ``flock``: the kernel releases it when the holder dies, so a killed run never
    leaves a stale lock behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderInUseError(
                f"{folder}: another {purpose} is using this folder; wait for it to finish "
                "or choose another folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
