"""Dynamic batching: requests that arrive together share one device call.

Each request's image waits under a key (its shape and settings: what one compiled program can
run together). A key's images go to the device as one batch when ``max_batch`` of them wait or
when the oldest has waited ``max_wait`` seconds, whichever comes first, as soon as one of the
workers (one per device) is free. While every worker is busy, waiting images simply gather into
larger batches. With ``early_dispatch``, a free worker does not wait out ``max_wait`` once no
request announced with `expect` (arrived, still being read or decoded) is on its way: the
requests that came together (clients answered together post again together) leave as one batch
as soon as the last of them is submitted, and a lone request leaves at once. At most
``max_queue`` images wait: one more is refused (`QueueFullError`), so a
burst can never grow the memory without bound. A request whose caller gave up (its future
cancelled) before its batch left is dropped from it: no work is left behind for it.

Device work runs in a thread pool, never on the event loop. With ``finish_batch``, a batch
has a second, host-side part, run in a thread of its own: the worker is free for the next batch
as soon as that part begins (at most one batch per worker waits to begin it), so that the host
finishes one batch while the device runs the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """The queue holds ``max_queue`` images already: try again later."""


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchInfo:
    """What a request learns of the batch that served it."""

    size: int  # requests in the batch
    queued_s: float  # from submission to the batch's start
    compute_s: float  # the batch's device call (and its host part)


RunBatch = Callable[[int, Hashable, Sequence[Any]], Any]
"""``(worker, key, items) -> results``: one device call, in a worker thread; worker i of n.
With a ``finish_batch``, it returns what that needs instead."""

FinishBatch = Callable[[int, Hashable, Any], Sequence[Any]]
"""``(worker, key, started) -> results``: a batch's host part, given ``run_batch``'s return."""


class DynamicBatcher:
    """Group ``submit``-ted items by key into batches for ``run_batch`` on ``workers`` threads.

    ``on_batch(size)``, ``on_queue(depth)`` and ``on_in_flight(count)`` report to metrics.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        workers: int = 1,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[int], None] = lambda size: None,
        on_queue: Callable[[int], None] = lambda depth: None,
        on_in_flight: Callable[[int], None] = lambda count: None,
        early_dispatch: bool = False,
        finish_batch: FinishBatch | None = None,
    ):
        self._run_batch = run_batch
        self._finish_batch = finish_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._on_batch, self._on_queue, self._on_in_flight = on_batch, on_queue, on_in_flight
        self._early_dispatch = early_dispatch
        self._expected = 0  # announced with `expect`, not yet submitted
        self._waiting: dict[Hashable, list[_Waiting]] = {}
        self._free_workers: asyncio.Queue[int] = asyncio.Queue()
        for worker in range(workers):
            self._free_workers.put_nowait(worker)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cheapnet-device")
        self._finish_pool = ThreadPoolExecutor(workers, thread_name_prefix="cheapnet-host")
        self._finishing = [asyncio.Lock() for _ in range(workers)]  # one batch each at a time
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task] = set()
        self._in_flight = 0
        self._closing = False
        self._dispatcher: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Images waiting for a batch (cancelled ones not counted)."""
        return sum(1 for queue in self._waiting.values() for w in queue if not w.future.done())

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    def expect(self) -> None:
        """A request has arrived and will be submitted (``submit(..., expected=True)``) or
        given up (`unexpect`)."""
        self._expected += 1

    def unexpect(self) -> None:
        """An expected request will not be submitted (it was refused)."""
        self._expected -= 1
        self._arrived.set()

    def submit(
        self, key: Hashable, item: Any, expected: bool = False
    ) -> asyncio.Future[tuple[Any, BatchInfo]]:
        """Queue ``item`` now and return the future of its result and batch; QueueFullError
        when ``max_queue`` items wait. ``expected``: announced with `expect` (the count drops
        here, synchronously, so a caller cancelled later cannot leave it behind). Cancelling the
        future (or a task awaiting it) drops the item if its batch has not left yet."""
        try:
            if self._closing:
                raise RuntimeError("the batcher is closing")
            if self.depth >= self._max_queue:
                raise QueueFullError(f"{self._max_queue} images are waiting already")
            waiting = _Waiting(item, asyncio.get_running_loop().create_future())
            self._waiting.setdefault(key, []).append(waiting)
        finally:
            if expected:  # in the queue (or refused) before the dispatcher looks again
                self._expected -= 1
        waiting.future.add_done_callback(self._on_cancelled)
        self._on_queue(self.depth)
        self._arrived.set()
        return waiting.future

    def _on_cancelled(self, future: asyncio.Future) -> None:
        if future.cancelled():  # the caller gave up: its item leaves the queue
            self._on_queue(self.depth)

    async def close(self) -> None:
        """Serve everything submitted so far, then stop the dispatcher and the threads."""
        self._closing = True
        self._arrived.set()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._pool.shutdown(wait=True)
        self._finish_pool.shutdown(wait=True)

    def _prune(self) -> None:
        for key in list(self._waiting):
            live = [w for w in self._waiting[key] if not w.future.done()]
            if live:
                self._waiting[key] = live
            else:
                del self._waiting[key]

    def _ready_key(self) -> tuple[Hashable | None, float | None]:
        """The key to run now (a full batch first, then the longest waiting past max_wait),
        else None and how long until the next one is due (None: nothing waits)."""
        self._prune()
        if not self._waiting:
            return None, None
        oldest = {key: queue[0].since for key, queue in self._waiting.items()}
        full = [key for key, queue in self._waiting.items() if len(queue) >= self._max_batch]
        if full:
            return min(full, key=oldest.get), 0.0
        key = min(oldest, key=oldest.get)
        due = oldest[key] + self._max_wait_s - time.monotonic()
        nothing_on_its_way = self._early_dispatch and self._expected == 0
        if due <= 0 or self._closing or nothing_on_its_way:
            return key, 0.0
        return None, due

    async def _next_key(self) -> Hashable | None:
        """Wait until a key is due (`_ready_key`); None once closing and nothing waits."""
        while True:
            key, due = self._ready_key()
            if key is not None:
                return key
            if due is None and self._closing:
                return None
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=due)

    async def _dispatch(self) -> None:
        # A worker first, then the key: while every worker is busy, images gather.
        while True:
            worker = await self._free_workers.get()
            key = await self._next_key()
            if key is None:
                return
            queue = self._waiting.pop(key)
            batch, rest = queue[: self._max_batch], queue[self._max_batch :]
            if rest:  # beyond max_batch: wait, in order, for the next batch
                self._waiting[key] = rest
            self._on_queue(self.depth)
            task = asyncio.get_running_loop().create_task(self._execute(worker, key, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, worker: int, key: Hashable, batch: list[_Waiting]) -> None:
        started = time.monotonic()
        self._in_flight += len(batch)
        self._on_in_flight(self._in_flight)
        self._on_batch(len(batch))
        freed = False

        def free_worker() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._free_workers.put_nowait(worker)
                self._arrived.set()

        loop = asyncio.get_running_loop()
        try:
            items = [w.item for w in batch]
            results = await loop.run_in_executor(self._pool, self._run_batch, worker, key, items)
            if self._finish_batch is not None:
                # The worker is freed once this batch's host part begins, not before: at most
                # one batch per worker waits with its device part done (bounded memory).
                async with self._finishing[worker]:
                    free_worker()
                    results = await loop.run_in_executor(
                        self._finish_pool, self._finish_batch, worker, key, results
                    )
        except Exception as err:  # every request of the batch gets the error
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(err)
        else:
            compute_s = time.monotonic() - started
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():
                    info = BatchInfo(len(batch), started - waiting.since, compute_s)
                    waiting.future.set_result((result, info))
        finally:
            self._in_flight -= len(batch)
            self._on_in_flight(self._in_flight)
            free_worker()
