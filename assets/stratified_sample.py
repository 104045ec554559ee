"""`stratified_sample`: draw the label-stratified sample from the snapshot and register its shards."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from dagster_project.partitions import SHARDS_PARTITIONS_NAME
from pseudolabel import layout
from pseudolabel.sampling import SamplingRules, stratified_sample as draw_sample, stratum_report
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet, write_parquet
from resources.storage import StorageResource


class StratifiedSampleConfig(Config):
    sample_size: int = Field(default=100_000, description="Target number of images in the sample.")
    min_per_stratum: int = Field(default=10, description="Every label gets at least this many (or all it has).")
    max_per_stratum: int | None = Field(default=None, description="Optional cap per label.")
    seed: int = Field(default=0, description="Same seed + same catalog = same sample.")
    shard_size: int = Field(default=1_000, description="Images per shard (one dynamic partition each).")


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


@asset(
    deps=["catalog_snapshot"],
    group_name="catalog",
    kinds={"pandas", "parquet"},
    description="Label-stratified sample of the snapshot; assigns image_id + shard and registers shards.",
)
def stratified_sample(
    context: AssetExecutionContext, config: StratifiedSampleConfig, storage: StorageResource
) -> MaterializeResult:
    store = storage.store()
    started = time.perf_counter()
    snapshot = read_current_snapshot(store)
    populations = {str(k): int(v) for k, v in snapshot["label_histogram"].items()}
    rules = SamplingRules(config.sample_size, config.min_per_stratum, config.max_per_stratum, config.seed)

    sample = draw_sample(iter_snapshot_chunks(store, snapshot), populations, rules, config.shard_size)
    write_parquet(store, layout.SAMPLE, sample)

    shards = sorted(sample["shard"].unique())
    known = set(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    new_shards = [s for s in shards if s not in known]
    if new_shards:
        context.instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, new_shards)
    stale = sorted(known - set(shards))
    if stale:
        context.log.warning(f"{len(stale)} registered shards are not in this sample (e.g. {stale[:3]}).")

    report = stratum_report(populations, sample)
    context.log.info(f"Sampled {len(sample):,} of {sum(populations.values()):,} rows into {len(shards)} shards")
    return MaterializeResult(
        metadata={
            "rows": len(sample),
            "population": sum(populations.values()),
            "strata": len(populations),
            "shards": len(shards),
            "new_shards_registered": len(new_shards),
            "seed": config.seed,
            "snapshot_id": snapshot.get("snapshot_id", ""),
            "per_stratum": MetadataValue.md(_stratum_markdown(report)),
            "elapsed_s": round(time.perf_counter() - started, 3),
            "path": MetadataValue.path(store.uri(layout.SAMPLE)),
        }
    )


def _stratum_markdown(report: pd.DataFrame, limit: int = 50) -> str:
    lines = ["| label | population | sampled | pop. share | sample share |", "|---|---:|---:|---:|---:|"]
    for row in report.head(limit).itertuples():
        lines.append(
            f"| {row.label} | {row.population:,} | {row.sampled:,} | "
            f"{row.population_share:.2%} | {row.sample_share:.2%} |"
        )
    if len(report) > limit:
        lines.append(f"| … {len(report) - limit} more strata | | | | |")
    return "\n".join(lines)
