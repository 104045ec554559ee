"""Give each concurrent GPU step its own device on a multi-GPU host.

The Dagster ``gpu`` pool bounds *how many* GPU steps run at once (set it to the number of GPUs);
this module decides *which* device each one gets. A lease is an exclusive ``fcntl`` lock on
``<lock_dir>/gpu-<index>.lock``; the kernel drops it when the holder exits, so a step that crashes
or is killed can never leave a device marked busy.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_LOCK_DIR = Path(os.environ.get("PSEUDOLABEL_GPU_LOCK_DIR", "/tmp/pseudolabel-gpu-locks"))


class NoFreeGpu(TimeoutError):
    """Every device stayed leased for longer than the timeout."""


@contextmanager
def lease_gpu(
    num_devices: int, lock_dir: Path = DEFAULT_LOCK_DIR, timeout_s: float = 3600.0, poll_s: float = 0.5
) -> Iterator[int]:
    """Yield the index of a device no other lease holds, and hold it until the block exits."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(num_devices):
            handle = open(lock_dir / f"gpu-{index}.lock", "a+")  # noqa: SIM115 - held for the lease
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid={os.getpid()}\n")
                handle.flush()
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() >= deadline:
            raise NoFreeGpu(
                f"all {num_devices} GPUs stayed leased for {timeout_s:.0f}s (locks in {lock_dir}); "
                "is the `gpu` pool limit larger than the number of GPUs?"
            )
        time.sleep(poll_s)
