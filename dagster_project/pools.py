"""The `gpu` concurrency pool: at most one concurrent GPU step per visible GPU."""

from __future__ import annotations

from dagster import DagsterInstance

from resources.workers import visible_gpus

GPU_POOL = "gpu"


def visible_gpu_count() -> int:
    """GPUs model workers are spread over on this host (``nvidia-smi -L``; no torch here)."""
    return len(visible_gpus())


def set_gpu_pool_limit(instance: DagsterInstance, limit: int | None = None) -> int:
    """Set the pool's slots to ``limit`` (default: visible GPUs, at least 1 so CPU hosts still run)."""
    slots = max(1, visible_gpu_count()) if limit is None else limit
    if slots < 1:
        raise ValueError(f"gpu pool limit must be >= 1, got {slots}")
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)
    return slots
