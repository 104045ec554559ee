"""Schedules and sensors: the catalog cursor kept in Dagster, incremental sampling that never adds an
item twice, and one shard-chain request per new shard."""

from datetime import UTC, datetime

import pytest
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    RunRequest,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    materialize,
)

from assets.catalog_snapshot import catalog_snapshot
from assets.stratified_sample import stratified_sample
from dagster_project.automation import catalog_growth_sensor, catalog_refresh_schedule, new_shards_sensor
from pseudolabel import layout
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.catalog import CatalogResource
from resources.storage import LocalStorageResource

LABELS = ["oak", "oak", "oak", "fern", "moss"]
SAMPLE_CONFIG = {"sample_size": 30, "min_per_stratum": 2, "shard_size": 10, "seed": 1}


def items(start, stop):
    return [
        {"image_url": f"https://img.example/{i}.jpg", "label": LABELS[i % len(LABELS)]}
        for i in range(start, stop)
    ]


def temp_instance(tmp_path) -> DagsterInstance:
    """Schedules need an instance with a ref (not ephemeral). Not `instance_for_test()`: its context
    manager leaves Dagster's defs-state ContextVar pointing at the disposed instance for later tests."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return DagsterInstance.local_temp(str(home))


@pytest.fixture
def catalog_world(tmp_path, dev_server):
    """A growable catalog on a local server, a sampled snapshot of its first 100 items, an instance."""
    catalog = items(0, 100)
    server = dev_server(
        lambda offset, limit: catalog[offset : offset + limit], total=10**6, report_total=False
    )
    resources = {
        "storage": LocalStorageResource(root=str(tmp_path / "data")),
        "catalog": CatalogResource(source=server.catalog_url, page_size=25),
    }
    yield from _sampled(catalog, server, resources, temp_instance(tmp_path), tmp_path)


def _sampled(catalog, server, resources, instance, tmp_path):
    result = materialize(
        [catalog_snapshot, stratified_sample],
        resources=resources,
        instance=instance,
        run_config={"ops": {"stratified_sample": {"config": SAMPLE_CONFIG}}},
    )
    assert result.success
    yield catalog, server, resources, instance, LocalObjectStore(tmp_path / "data")


def run_increment(request: RunRequest, resources, instance):
    config = {**SAMPLE_CONFIG, **request.run_config["ops"]["stratified_sample"]["config"]}
    result = materialize(
        [stratified_sample],
        resources=resources,
        instance=instance,
        run_config={"ops": {"stratified_sample": {"config": config}}},
    )
    assert result.success
    return result.asset_materializations_for_node("stratified_sample")[0].metadata


def test_schedule_skips_until_a_sample_exists(tmp_path):
    when = datetime(2026, 11, 21, 3, tzinfo=UTC)
    context = build_schedule_context(instance=temp_instance(tmp_path), scheduled_execution_time=when)
    assert isinstance(catalog_refresh_schedule(context), SkipReason)


def test_schedule_samples_new_items_once_and_registers_new_shards(catalog_world):
    catalog, _server, resources, instance, store = catalog_world
    before = read_parquet(store, layout.SAMPLE).to_pandas()
    shards_before = set(instance.get_dynamic_partitions("shards"))
    assert len(before) == 30 and shards_before == {"shard-00000", "shard-00001", "shard-00002"}

    catalog.extend(items(100, 160))  # the catalog grows by 60 items
    when = datetime(2026, 11, 22, 3, tzinfo=UTC)
    request = catalog_refresh_schedule(
        build_schedule_context(instance=instance, scheduled_execution_time=when)
    )
    assert request.run_config["ops"]["stratified_sample"]["config"] == {
        "mode": "incremental",
        "start_offset": 100,
    }
    metadata = run_increment(request, resources, instance)

    after = read_parquet(store, layout.SAMPLE).to_pandas()
    added = after.iloc[len(before) :]
    assert metadata["catalog_offset"].value == 160 and len(added) == metadata["rows_added"].value > 0
    assert added["url"].str.extract(r"/(\d+)\.jpg")[0].astype(int).ge(100).all()  # only new items
    assert not after["url"].duplicated().any()
    assert set(added["shard"]).isdisjoint(set(before["shard"]))  # new shards, old ones untouched
    assert set(instance.get_dynamic_partitions("shards")) == shards_before | set(added["shard"])

    # Re-running the same request adds nothing twice; the next tick starts from the new cursor.
    assert run_increment(request, resources, instance)["rows_added"].value == 0
    assert len(read_parquet(store, layout.SAMPLE).to_pandas()) == len(after)
    next_tick = catalog_refresh_schedule(
        build_schedule_context(instance=instance, scheduled_execution_time=when)
    )
    assert next_tick.run_config["ops"]["stratified_sample"]["config"]["start_offset"] == 160


def test_growth_sensor_fires_only_when_the_reported_total_grows(catalog_world, dev_server, tmp_path):
    catalog, _server, resources, instance, _store = catalog_world
    reporting = dev_server(lambda offset, limit: catalog[offset : offset + limit], total=100)
    sensor_resources = {"catalog": CatalogResource(source=reporting.catalog_url)}

    context = build_sensor_context(instance=instance, resources=sensor_resources)
    assert isinstance(catalog_growth_sensor(context), SkipReason)  # total 100 == cursor 100

    reporting.total = 150
    context = build_sensor_context(instance=instance, resources=sensor_resources, cursor=context.cursor)
    request = catalog_growth_sensor(context)
    assert isinstance(request, RunRequest) and request.run_key == "catalog-growth-100-150"
    again = build_sensor_context(instance=instance, resources=sensor_resources, cursor=context.cursor)
    assert isinstance(catalog_growth_sensor(again), SkipReason)


def ranges_of(requests) -> list[tuple[str, str, str]]:
    return [
        (
            r.tags["dagster/asset_partition_range_start"],
            r.tags["dagster/asset_partition_range_end"],
            r.run_key,
        )
        for r in requests
    ]


def test_new_shards_sensor_requests_unprocessed_shards_in_range_runs_once(catalog_world, monkeypatch):
    _catalog, _server, _resources, instance, _store = catalog_world
    instance.add_dynamic_partitions("shards", [f"shard-{n:05d}" for n in range(3, 8)])
    instance.report_runless_asset_event(AssetMaterialization("normalized_images", partition="shard-00001"))
    monkeypatch.setenv("PSEUDOLABEL_SHARDS_PER_RUN", "3")
    context = build_sensor_context(instance=instance)
    requests = new_shards_sensor(context)
    # A processed shard ends a range (a run covers every partition of its range); at most 3 per run.
    assert ranges_of(requests) == [
        ("shard-00000", "shard-00000", "shard-chain-shard-00000..shard-00000"),
        ("shard-00002", "shard-00004", "shard-chain-shard-00002..shard-00004"),
        ("shard-00005", "shard-00007", "shard-chain-shard-00005..shard-00007"),
    ]
    assert all(r.partition_key is None for r in requests)
    # The cursor remembers what was requested: the next tick asks for nothing until new shards come.
    context = build_sensor_context(instance=instance, cursor=context.cursor)
    assert isinstance(new_shards_sensor(context), SkipReason)
    instance.add_dynamic_partitions("shards", ["shard-00008"])
    assert ranges_of(new_shards_sensor(context)) == [
        ("shard-00008", "shard-00008", "shard-chain-shard-00008..shard-00008")
    ]
