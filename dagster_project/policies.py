"""Retry and backfill policies shared by the assets, so they are tuned in one place.

``PSEUDOLABEL_STEP_RETRIES`` overrides how often a failed network/GPU step is retried and
``PSEUDOLABEL_STEP_RETRY_DELAY_S`` the first delay (read when the code location loads; 0 retries
disables them, as the test suite does). Only failures a retry can fix are retried: steps raise
``Failure(allow_retries=False)`` for configuration errors, missing or mismatched checkpoints and code
errors (see ``resources/workers.py``). A retried GPU step runs with half the batch size per retry.
"""

import os

from dagster import BackfillPolicy, Backoff, Jitter, RetryPolicy

STEP_RETRIES_ENV = "PSEUDOLABEL_STEP_RETRIES"
STEP_RETRY_DELAY_ENV = "PSEUDOLABEL_STEP_RETRY_DELAY_S"


def _retries(default: int) -> int:
    raw = os.environ.get(STEP_RETRIES_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{STEP_RETRIES_ENV} must be a whole number >= 0, got {raw!r}")
    return int(raw)


def _delay(default: float) -> float:
    raw = os.environ.get(STEP_RETRY_DELAY_ENV, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{STEP_RETRY_DELAY_ENV} must be a number of seconds, got {raw!r}") from None


# Catalog and image hosts: transient outages get a few spaced-out retries of the whole step
# (requests are already retried individually inside the step).
NETWORK_RETRY = RetryPolicy(
    max_retries=_retries(3), delay=_delay(30), backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)

# GPU steps: a lost node or a transient CUDA error is worth one or two more tries, not more.
GPU_RETRY = RetryPolicy(
    max_retries=_retries(2), delay=_delay(60), backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)

# Per-shard work: a backfill run takes up to this many shards (each still its own partition and
# materialization), so a GPU step's model worker loads the models once for all of them, and the
# chain job (images -> detections -> masks -> labels) keeps that range end to end; runs spread over
# processes, pods and GPUs.
SHARDS_PER_RUN_ENV = "PSEUDOLABEL_SHARDS_PER_RUN"
SHARDS_PER_RUN = BackfillPolicy.multi_run(
    max_partitions_per_run=int(os.environ.get(SHARDS_PER_RUN_ENV, "").strip() or 10)
)

# Cheap CPU-only work: a backfill over many shards is one run.
SINGLE_RUN = BackfillPolicy.single_run()


def gpu_shard_asset_args() -> dict:
    """Decorator arguments every GPU stage shares: per-shard partitions, the `gpu` pool (one slot per
    GPU: the step's model worker holds a GPU), GPU retries, a range of shards per backfill run."""
    from dagster_project.partitions import shard_partitions

    return {
        "partitions_def": shard_partitions,
        "group_name": "models",
        "pool": "gpu",
        "retry_policy": GPU_RETRY,
        "backfill_policy": SHARDS_PER_RUN,
    }
