"""Ordered, bounded read-ahead: CPU workers prepare the next batches while the GPU runs this one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def prefetched_batches(
    items: Sequence[T],
    load: Callable[[T], U],
    batch_size: int,
    workers: int,
    lookahead_batches: int = 2,
) -> Iterator[list[U]]:
    """Yield ``[load(item) ...]`` in batches of ``batch_size``, in input order.

    Threads suffice: JPEG decode, resize, object-store reads and CUDA kernels all release the GIL.
    At most ``(lookahead_batches + 1) * batch_size`` items are in flight, which bounds host memory.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be >= 1")
    window = (lookahead_batches + 1) * batch_size
    pending: deque[Future[U]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        try:
            next_item = 0
            while next_item < len(items) or pending:
                while next_item < len(items) and len(pending) < window:
                    pending.append(pool.submit(load, items[next_item]))
                    next_item += 1
                take = min(batch_size, len(pending))
                yield [pending.popleft().result() for _ in range(take)]
        finally:
            for future in pending:  # consumer stopped early or a load failed: drop queued work
                future.cancel()
