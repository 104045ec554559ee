"""`stratified_sample`: draw the label-stratified sample and register its shards as partitions.

``mode="full"`` samples the whole current snapshot. ``mode="incremental"`` (what the refresh schedule
and growth sensor launch) reads catalog items from ``start_offset`` on, samples them with the same
rules, appends them in new shards and registers those; items already sampled are never added again.
The catalog offset reached is recorded as ``catalog_offset`` metadata: the cursor Dagster keeps.
"""

import time
from collections.abc import Iterator
from typing import Literal

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.common import CURSOR_METADATA_KEY, SHARDS_PARTITIONS_NAME, catalog_cursor
from pseudolabel import layout
from pseudolabel.markdown import markdown_table
from pseudolabel.sampling import SamplingRules, extend_sample, stratum_report
from pseudolabel.sampling import stratified_sample as draw_sample
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet, write_parquet
from resources.catalog import CatalogResource
from resources.storage import StorageResource


class StratifiedSampleConfig(Config):
    sample_size: int = Field(default=100_000, description="Target number of images in the sample.")
    min_per_stratum: int = Field(
        default=10, description="Every label gets at least this many (or all it has)."
    )
    max_per_stratum: int | None = Field(default=None, description="Optional cap per label.")
    seed: int = Field(default=0, description="Same seed + same catalog = same sample.")
    shard_size: int = Field(default=1_000, description="Images per shard (one dynamic partition each).")
    mode: Literal["full", "incremental"] = Field(
        default="full",
        description="full: resample the snapshot; incremental: add catalog items past start_offset.",
    )
    start_offset: int | None = Field(
        default=None,
        description="incremental only: catalog offset to read from (the schedule passes the cursor).",
    )


def read_current_snapshot(store: ObjectStore) -> dict:
    try:
        return store.get_json(layout.CATALOG_CURRENT)
    except ObjectNotFound as exc:
        raise FileNotFoundError(
            f"No catalog snapshot at {store.uri(layout.CATALOG_CURRENT)}: materialize `catalog_snapshot` first."
        ) from exc


def iter_snapshot_chunks(store: ObjectStore, snapshot: dict) -> Iterator[pd.DataFrame]:
    for part in snapshot["parts"]:
        yield read_parquet(store, part, columns=["url", "label", "source_id"]).to_pandas()


def register_shards(context: AssetExecutionContext, shards: list[str]) -> list[str]:
    known = set(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    new_shards = [s for s in shards if s not in known]
    if new_shards:
        context.instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, new_shards)
    return new_shards


@asset(
    deps=["catalog_snapshot"],
    group_name="catalog",
    kinds={"pandas", "parquet"},
    description="Label-stratified sample of the snapshot; assigns image_id + shard and registers shards.",
)
def stratified_sample(
    context: AssetExecutionContext,
    config: StratifiedSampleConfig,
    storage: StorageResource,
    catalog: CatalogResource,
) -> MaterializeResult:
    store = storage.store()
    started = time.perf_counter()
    snapshot = read_current_snapshot(store)
    populations = {str(k): int(v) for k, v in snapshot["label_histogram"].items()}
    rules = SamplingRules(config.sample_size, config.min_per_stratum, config.max_per_stratum, config.seed)

    if config.mode == "full":
        sample = draw_sample(iter_snapshot_chunks(store, snapshot), populations, rules, config.shard_size)
        added, offset = sample, int(snapshot.get("end_offset", 0))
    else:
        sample, added, offset = _extend(context, config, store, catalog, snapshot, rules)
    write_parquet(store, layout.SAMPLE, sample)

    shards = sorted(sample["shard"].unique())
    new_shards = register_shards(context, sorted(added["shard"].unique()))
    stale = sorted(set(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)) - set(shards))
    if stale:
        context.log.warning(f"{len(stale)} registered shards are not in this sample (e.g. {stale[:3]}).")

    report = stratum_report(populations, sample)
    context.log.info(
        f"{config.mode}: sample has {len(sample):,} rows in {len(shards)} shards (+{len(added):,})"
    )
    return MaterializeResult(
        metadata={
            "mode": config.mode,
            "rows": len(sample),
            "rows_added": len(added),
            "population": sum(populations.values()),
            "strata": len(populations),
            "shards": len(shards),
            "new_shards_registered": len(new_shards),
            CURSOR_METADATA_KEY: offset,
            "seed": config.seed,
            "snapshot_id": snapshot.get("snapshot_id", ""),
            "per_stratum": MetadataValue.md(_stratum_markdown(report)),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "path": MetadataValue.path(store.uri(layout.SAMPLE)),
        }
    )


def _extend(context, config, store, catalog, snapshot, rules):
    """Incremental mode: sample catalog items past the cursor and append them."""
    if config.start_offset is None:
        raise ValueError("mode='incremental' needs start_offset (the schedule passes the Dagster cursor).")
    existing = read_parquet(store, layout.SAMPLE).to_pandas()
    # Items before the recorded cursor were already considered (sampled or not): re-reading them would
    # let a repeated request draw more of them, so a stale start_offset moves up to the cursor.
    start = max(config.start_offset, catalog_cursor(context.instance) or 0)
    if start > config.start_offset:
        context.log.info(f"start_offset {config.start_offset:,} is behind the cursor; reading from {start:,}")
    frames, offset = [], start
    # New items since the last tick are few compared with the catalog; they are held in memory.
    for batch in catalog.iter_batches(start_offset=start):
        frames.append(batch.table.to_pandas())
        offset = max(offset, batch.end_offset)
    new_items = (
        pd.concat(frames, ignore_index=True) if frames else existing.iloc[:0][["url", "label", "source_id"]]
    )
    rate = len(existing) / max(1, sum(int(v) for v in snapshot["label_histogram"].values()))
    added = extend_sample(existing, new_items, rate, rules, config.shard_size)
    context.log.info(f"read {len(new_items):,} catalog items from offset {start:,} to {offset:,}")
    return pd.concat([existing, added], ignore_index=True), added, offset


def _stratum_markdown(report: pd.DataFrame, limit: int = 50) -> str:
    shown = pd.DataFrame(
        {
            "label": report["label"],
            "population": report["population"].map("{:,}".format),
            "sampled": report["sampled"].map("{:,}".format),
            "pop. share": report["population_share"].map("{:.2%}".format),
            "sample share": report["sample_share"].map("{:.2%}".format),
        }
    ).head(limit)
    table = markdown_table(shown)
    if len(report) > limit:
        table += f"\n| … {len(report) - limit} more strata | | | | |"
    return table
