"""What the asset modules share: the shard partitions, retry and backfill policies, the catalog cursor.

Not an asset module: asset modules import this one and never each other (``tests/test_layering.py``).

``PSEUDOLABEL_STEP_RETRIES`` overrides how often a failed network/GPU step is retried,
``PSEUDOLABEL_STEP_RETRY_DELAY_S`` the first delay and ``PSEUDOLABEL_SHARDS_PER_RUN`` how many shards a
backfill run of a per-shard asset takes. They are deployment settings of the code location, read when
it loads (decorator arguments), like the executor choice; 0 retries disables retries, as the test suite
does. Only failures a retry can fix are retried: steps raise ``Failure(allow_retries=False)`` for
configuration errors, missing or mismatched checkpoints and code errors (see ``resources/workers.py``).
A retried GPU step runs with half the batch size per retry, and reuses the shards it already finished.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    BackfillPolicy,
    Backoff,
    Config,
    DagsterInstance,
    DynamicPartitionsDefinition,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
)
from pydantic import Field

from pseudolabel.dataset.gates import GATE_DESCRIPTIONS, GATES, dataset_gates
from pseudolabel.labels.lineage import stale_shards
from pseudolabel.review.corrections import kept_precision
from pseudolabel.storage import ObjectStore

SHARDS_PARTITIONS_NAME = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS_PARTITIONS_NAME)
"""Shards are dynamic partitions shared by every partitioned asset of the chain."""

STEP_RETRIES_ENV = "PSEUDOLABEL_STEP_RETRIES"
STEP_RETRY_DELAY_ENV = "PSEUDOLABEL_STEP_RETRY_DELAY_S"
SHARDS_PER_RUN_ENV = "PSEUDOLABEL_SHARDS_PER_RUN"


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


def _shards_per_run(default: int) -> int:
    raw = os.environ.get(SHARDS_PER_RUN_ENV, "").strip()
    if raw and (not raw.isdigit() or int(raw) < 1):
        raise ValueError(f"{SHARDS_PER_RUN_ENV} must be a whole number >= 1, got {raw!r}")
    return int(raw) if raw else default


def network_retry() -> RetryPolicy:
    """Catalog and image hosts: transient outages get a few spaced-out retries of the whole step
    (requests are already retried individually inside the step)."""
    return RetryPolicy(
        max_retries=_retries(3), delay=_delay(30), backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
    )


def gpu_retry() -> RetryPolicy:
    """GPU steps: a lost node or a transient CUDA error is worth one or two more tries, not more."""
    return RetryPolicy(
        max_retries=_retries(2), delay=_delay(60), backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
    )


def shards_per_run_count() -> int:
    """How many shards a range run of the per-shard chain takes (``PSEUDOLABEL_SHARDS_PER_RUN``, default 10):
    the UI backfills' grouping, and the new-shards sensor's."""
    return _shards_per_run(10)


def shards_per_run() -> BackfillPolicy:
    """Per-shard work: a backfill run takes a range of shards (each still its own partition and
    materialization), so a GPU step's model worker loads the models once for all of them, and the
    chain job keeps that range end to end; runs spread over processes, pods and GPUs."""
    return BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run_count())


# Cheap CPU-only work: a backfill over many shards is one run.
SINGLE_RUN = BackfillPolicy.single_run()


class GpuStageConfig(Config):
    """What every GPU stage's config has."""

    force: bool = Field(
        default=False,
        description=(
            "Recompute every shard of the run. By default a shard whose stored output already has the "
            "fingerprint of its inputs, model and settings (not batch size, workers, device or retry) is "
            "reused without running the models, so a re-run or a retry redoes only the shards still missing."
        ),
    )


GPU_POOL = "gpu"  # one slot per GPU: `pseudolabel gpu-pool` sets it from the visible GPUs


def gpu_shard_asset_args() -> dict:
    """Decorator arguments every GPU stage shares: per-shard partitions, the `gpu` pool (one slot per
    GPU: the step's model worker holds a GPU), GPU retries, a range of shards per backfill run."""
    return {
        "partitions_def": shard_partitions,
        "group_name": "models",
        "pool": GPU_POOL,
        "retry_policy": gpu_retry(),
        "backfill_policy": shards_per_run(),
    }


def materialize_each_shard(
    context: AssetExecutionContext, process: Callable[[str], dict[str, object]]
) -> MaterializeResult:
    """``process(shard) -> metadata`` for every shard of the run (one, or a backfill range), one
    materialization per shard. When a shard fails, the shards already finished are recorded before the
    failure propagates, so a rerun shows what is done."""
    done: dict[str, dict[str, object]] = {}
    for shard in context.partition_keys:
        try:
            done[shard] = process(shard)
        except BaseException:
            for finished, metadata in done.items():
                context.log_event(
                    AssetMaterialization(context.asset_key, partition=finished, metadata=metadata)
                )
            raise
    for shard, metadata in done.items():
        context.add_asset_metadata(metadata, partition_key=shard)
    return MaterializeResult()


def fail_above_rate(
    shard: str, quarantined: int, total: int, max_rate: float, what: str, metadata: dict, hint: str = ""
) -> None:
    """Fail the shard (once: the same inputs would fail the same way) when more than ``max_rate`` of
    its ``total`` ``what`` were quarantined; the index was written first, so nothing is lost."""
    rate = quarantined / total if total else 0.0
    if rate > max_rate:
        raise Failure(
            description=(
                f"{shard}: {quarantined} of {total} {what} quarantined ({rate:.0%} > max_failure_rate "
                f"{max_rate:.0%}); the index was written, see the quarantine reasons. Fix the cause and "
                f"re-materialize{hint}."
            ),
            metadata=metadata,
            allow_retries=False,
        )


# The catalog cursor lives in Dagster: ``catalog_offset`` metadata of the latest ``stratified_sample``.
SAMPLE_KEY = AssetKey("stratified_sample")
CURSOR_METADATA_KEY = "catalog_offset"


def catalog_cursor(instance: DagsterInstance) -> int | None:
    """How far into the catalog the sample has looked (None: never sampled)."""
    event = instance.get_latest_materialization_event(SAMPLE_KEY)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(CURSOR_METADATA_KEY)
    return None if value is None else int(value.value)


class GateConfig(Config):
    """The publish gates' knobs, shared by the dataset and the exports."""

    allow_mixed_thresholds: bool = Field(
        default=False,
        description="Publish shards labelled with different thresholds (e.g. while a relabel backfill runs).",
    )
    target_precision: float = Field(
        default=0.9,
        description="Reviewed-precision gate: classes with enough reviews must reach this precision.",
    )
    min_reviewed: int = Field(
        default=20,
        description="Reviewed kept instances (uniform sample) a class needs before the precision gate judges it.",
    )


def gate_check_specs(asset_name: str) -> list[AssetCheckSpec]:
    """The publish gates as blocking checks of ``asset_name``."""
    return [
        AssetCheckSpec(name, asset=asset_name, blocking=True, description=GATE_DESCRIPTIONS[name])
        for name in GATES
    ]


def enforce_gates(
    store: ObjectStore, samples: pd.DataFrame, shards: list[str], reviewed: pd.DataFrame, config: GateConfig
) -> Iterator[AssetCheckResult]:
    """Evaluate the publish gates over what is about to be published, report each as a check result, and
    stop the step (nothing published) when one fails."""
    gates = dataset_gates(
        samples,
        stale=stale_shards(store, shards),
        precision=kept_precision(reviewed) if len(reviewed) else pd.DataFrame(),
        target_precision=config.target_precision,
        min_reviewed=config.min_reviewed,
        allow_mixed_thresholds=config.allow_mixed_thresholds,
    )
    for gate in gates:
        yield AssetCheckResult(
            check_name=gate.name,
            passed=gate.passed,
            description=gate.summary,
            metadata={"summary": gate.summary, "details": MetadataValue.json(gate.details)},
        )
    failed = [g for g in gates if not g.passed]
    if failed:
        raise Failure(
            description="Not published: " + "; ".join(f"{g.name}: {g.summary}" for g in failed),
            metadata={g.name: MetadataValue.json(g.details) for g in failed},
            allow_retries=False,
        )
