"""glibc's allocator set so that XLA:CPU reuses its temporary buffers instead of faulting them in
on every call.

XLA:CPU allocates one block for a program's temporaries on each execution, from the thread
that runs it. CheapNet-M on a 512x512 image needs about 130 MiB of them. glibc serves a block
that large from a fresh `mmap` and unmaps it when freed: the block is not kept by XLA's
threads, whose arenas cannot grow past 64 MiB, nor by the main arena, above its mmap threshold.
Each call then faults in and zeroes about 33,000 fresh pages, work that can outweigh the
network itself: on the AMD EPYC VM (2 cores), CheapNet-M at batch 1 ran 54 ms per image, of
which more than half was kernel time, and 21 ms once the pages were kept (BENCHMARKS.md,
"Inference on AMD EPYC").

`keep_freed_memory` puts every thread on glibc's main arena and raises its mmap and trim
thresholds to 256 MiB, so that a freed block up to that size stays in the process and the next
call reuses it. It must run before XLA's threads first allocate, that is before JAX's CPU
backend starts: importing `cheapnet_jax` calls it. Set ``CHEAPNET_JAX_MALLOC=system`` before
the import to leave glibc's defaults.

Kept memory alone would accumulate when the work changes: blocks freed by one program sit in
the heap among live ones, and the next program's blocks of other sizes fit between them only
partly, so the heap grows past what is live. A process running the authors' checkpoints one
width after another (G = 8, 32, 64 eagerly, float64 and float32) peaked at 1.7x the memory of
glibc's defaults, G = 32 alone at 2.1x. So after every compilation (a new program: new block
sizes ahead) the freed memory's pages go back to the system (`malloc_trim`): the heap keeps its
layout, its free pages cost nothing until reused, and a program called again and again, which
compiles nothing, still reuses its blocks without faults (BENCHMARKS.md, "Many widths in one
process").
"""

from __future__ import annotations

import ctypes
import os
import platform

OPT_OUT_VARIABLE = "CHEAPNET_JAX_MALLOC"
"""Set to ``system`` to keep glibc's default allocator settings."""

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks up to 256 MiB come from the heap, and up to 256 MiB of freed memory at its top is kept:
# CheapNet-M's 130 MiB of temporaries at 512x512 are reused. Larger blocks (CheapNet-L, large
# images) are still mapped and unmapped per call: kept on the heap, their freed space would
# stay with the process (a worker of the test suite that ran the G = 1024 reproduction after
# other tests reached 18.6 GiB with 1 GiB here; that test alone: 7.7 GiB with glibc's
# defaults, 10.0 with 1 GiB, 7.8 with 256 MiB).
_KEEP_BYTES = 256 << 20
# Recorded by JAX after each backend compilation (also for a persistent-cache hit), on the
# compiling thread.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def keep_freed_memory() -> str:
    """Set glibc's allocator to keep freed blocks for reuse; say what was done.

    Returns a short description for benchmark reports: ``"kept (glibc, one arena)"`` when set,
    else why not (another C library, the opt-out variable, or glibc refusing a setting).
    """
    if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() == "system":
        return f"system defaults ({OPT_OUT_VARIABLE}=system)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"system defaults (not glibc: {platform.system()})"
    libc = ctypes.CDLL(None)
    settings = {
        "arena max": (_M_ARENA_MAX, 1),
        "mmap threshold": (_M_MMAP_THRESHOLD, _KEEP_BYTES),
        "trim threshold": (_M_TRIM_THRESHOLD, _KEEP_BYTES),
    }
    refused = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    if refused:
        return f"partly kept (glibc refused: {', '.join(refused)})"
    _release_freed_pages_after_compiles(libc)
    return "kept (glibc, one arena)"


def _release_freed_pages_after_compiles(libc: ctypes.CDLL) -> None:
    """Hand the heap's free pages back to the system whenever JAX has compiled a program."""
    # Imported here: the settings above must be made before anything of JAX starts.
    import jax.monitoring

    def release(event: str, duration_secs: float, **_: object) -> None:
        if event == _COMPILE_EVENT:
            # malloc_trim(0): every free chunk's whole pages are returned (madvise), not only
            # the heap's top; the call costs well under a compilation.
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(release)
