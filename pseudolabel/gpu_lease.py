"""Give each concurrent GPU step its own device on a multi-GPU host.

The Dagster ``gpu`` pool bounds *how many* GPU steps run at once (set it to the number of GPUs);
this module decides *which* device each one gets. A lease is an exclusive ``flock`` on
``<lock_dir>/gpu-<index>.lock``. The lock belongs to the open file, not to a process: the kernel drops it
once every descriptor of that file is closed, so a step that crashes or is killed can never leave a
device marked busy, and a model worker started with the descriptor (:attr:`GpuLease.fd`, see
:mod:`pseudolabel.workers.lifetime`) keeps the device leased for as long as it runs, even past its step.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LOCK_DIR = Path(os.environ.get("PSEUDOLABEL_GPU_LOCK_DIR", "/tmp/pseudolabel-gpu-locks"))


class NoFreeGpu(TimeoutError):
    """Every device stayed leased for longer than the timeout."""


@dataclass(frozen=True)
class GpuLease:
    """A held device: its index among the host's devices and the locked descriptor. A child process
    started with ``fd`` (``subprocess.Popen(..., pass_fds=[lease.fd])``) holds the lease with the
    holder: it is free again only when both have closed it (exited)."""

    index: int
    fd: int
    path: Path


@contextmanager
def hold_gpu(
    num_devices: int, lock_dir: Path = DEFAULT_LOCK_DIR, timeout_s: float = 3600.0, poll_s: float = 0.5
) -> Iterator[GpuLease]:
    """Yield a :class:`GpuLease` on a device no other lease holds; this process lets go of it when the
    block exits (processes that inherited the descriptor keep holding it until they exit)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(num_devices):
            path = lock_dir / f"gpu-{index}.lock"
            handle = open(path, "a+")  # noqa: SIM115 - held for the lease
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
                yield GpuLease(index, handle.fileno(), path)
            finally:
                # Close, never LOCK_UN: an unlock would release the lock for a worker that shares it.
                handle.close()
            return
        if time.monotonic() >= deadline:
            raise NoFreeGpu(
                f"all {num_devices} GPUs stayed leased for {timeout_s:.0f}s (locks in {lock_dir}); "
                "is the `gpu` pool limit larger than the number of GPUs?"
            )
        time.sleep(poll_s)


@contextmanager
def lease_gpu(
    num_devices: int, lock_dir: Path = DEFAULT_LOCK_DIR, timeout_s: float = 3600.0, poll_s: float = 0.5
) -> Iterator[int]:
    """Yield the index of a device no other lease holds, and hold it until the block exits."""
    with hold_gpu(num_devices, lock_dir, timeout_s, poll_s) as lease:
        yield lease.index
