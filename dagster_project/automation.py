"""Schedules and sensors: pick up new catalog items and run new shards, without ever doing work twice.

The catalog cursor lives in Dagster: it is the ``catalog_offset`` metadata of the latest
``stratified_sample`` materialization (how far into the catalog the sample has looked), so it
survives restarts and is visible in the UI. Run keys make every request idempotent.
"""

from __future__ import annotations

import json
import os

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    schedule,
    sensor,
)

from assets.common import SHARDS_PARTITIONS_NAME, catalog_cursor, shards_per_run_count
from dagster_project.jobs import sample_increment_job, shard_chain_job
from pseudolabel import layout
from pseudolabel.storage import ObjectNotFound
from resources.catalog import CatalogResource
from resources.label_studio import LabelStudioResource
from resources.storage import StorageResource

REFRESH_CRON_ENV = "PSEUDOLABEL_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 3 * * *"  # daily, 03:00
FIRST_SHARD_ASSET = AssetKey("normalized_images")
MAX_SHARD_RUNS_PER_TICK = 100
# Dagster's tags for a run over a partition range (what a UI backfill of ranges sets).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def increment_request(offset: int, run_key: str) -> RunRequest:
    return RunRequest(
        run_key=run_key,
        run_config={
            "ops": {"stratified_sample": {"config": {"mode": "incremental", "start_offset": offset}}}
        },
        tags={"pseudolabel/catalog_offset": str(offset)},
    )


@schedule(
    job=sample_increment_job,
    cron_schedule=os.environ.get(REFRESH_CRON_ENV, DEFAULT_REFRESH_CRON),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Sample catalog items added since the last cursor and register their shards.",
)
def catalog_refresh_schedule(context: ScheduleEvaluationContext):
    offset = catalog_cursor(context.instance)
    if offset is None:
        return SkipReason("No stratified_sample yet: materialize catalog_snapshot + stratified_sample first.")
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return increment_request(offset, run_key=f"catalog-refresh-{offset}-{day}")


@sensor(
    job=sample_increment_job,
    minimum_interval_seconds=3600,
    default_status=DefaultSensorStatus.STOPPED,
    description="Sample new items as soon as the catalog's reported `total` grows.",
)
def catalog_growth_sensor(context: SensorEvaluationContext, catalog: CatalogResource):
    offset = catalog_cursor(context.instance)
    if offset is None:
        return SkipReason("No stratified_sample yet: materialize catalog_snapshot + stratified_sample first.")
    total = catalog.fetch_total()
    if total is None:
        return SkipReason("The catalog does not report `total`; use catalog_refresh_schedule instead.")
    seen = json.loads(context.cursor)["total"] if context.cursor else None
    context.update_cursor(json.dumps({"total": total}))
    if total <= offset or (seen is not None and total <= seen):
        return SkipReason(f"Catalog total {total:,} has not grown past offset {offset:,}.")
    return increment_request(offset, run_key=f"catalog-growth-{offset}-{total}")


@sensor(
    job=shard_chain_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "Runs the shard chain over every registered shard never processed, in range runs of "
        "`PSEUDOLABEL_SHARDS_PER_RUN` shards (the UI backfills' grouping): one model load per GPU step "
        "and range. The cursor is the last shard requested, so no shard is requested twice."
    ),
)
def new_shards_sensor(context: SensorEvaluationContext):
    shards = sorted(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    done = context.instance.get_materialized_partitions(FIRST_SHARD_ASSET)
    ranges = unprocessed_ranges(shards, done, after=context.cursor or "", size=shards_per_run_count())
    if not ranges:
        return SkipReason("Every registered shard has been processed or requested.")
    ranges = ranges[:MAX_SHARD_RUNS_PER_TICK]
    context.update_cursor(ranges[-1][-1])
    return [shard_range_request(group[0], group[-1]) for group in ranges]


def unprocessed_ranges(shards: list[str], done: set[str], *, after: str, size: int) -> list[list[str]]:
    """Runs of consecutive (in partition order) shards after ``after`` that are not ``done``, at most
    ``size`` each: a processed shard ends a run, since a run covers every partition of its range."""
    ranges: list[list[str]] = []
    current: list[str] = []
    for shard in sorted(shards):
        if shard <= after:
            continue
        if shard in done or len(current) == size:
            if current:
                ranges.append(current)
            current = []
        if shard not in done:
            current.append(shard)
    if current:
        ranges.append(current)
    return ranges


def shard_range_request(first: str, last: str) -> RunRequest:
    """One run of the shard chain over the shards ``first`` .. ``last`` (in partition order); the run key
    makes a repeated request launch nothing."""
    return RunRequest(
        run_key=f"shard-chain-{first}..{last}",
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
    )


@sensor(
    asset_selection=AssetSelection.assets("reviewed_labels"),
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "Polls the Label Studio review project and materializes `reviewed_labels` when reviewers have "
        "submitted or edited annotations since the last tick (the cursor is the latest annotation time seen)."
    ),
)
def label_studio_reviews_sensor(
    context: SensorEvaluationContext, storage: StorageResource, label_studio: LabelStudioResource
):
    try:
        state = storage.store().get_json(layout.REVIEW_STATE)
    except ObjectNotFound:
        return SkipReason("No review project yet: materialize review_queue first.")
    since = context.cursor or state.get("reviewed_until")
    reviewed = label_studio.client().reviewed_tasks(int(state["project_id"]), updated_after=since)
    if not reviewed.tasks:
        return SkipReason(f"No annotation submitted or edited since {since or 'the start'}.")
    context.update_cursor(reviewed.cursor)
    # reviewed_labels reads from its own stored cursor, so a failed run is caught up by the next one.
    return RunRequest(run_key=f"reviews-{reviewed.cursor}")
