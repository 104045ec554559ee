"""A threshold edit marks every pseudo_labels shard unsynced; the backfill that re-labels them runs no
detections or masks step. Proven from the instance's event log, on a chain materialized end to end."""

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterEventType, DagsterInstance

# Staleness is what the UI's "unsynced" badge and "Materialize unsynced" use; there is no public API.
from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._utils.test.data_versions import get_stale_status_resolver

from dagster_project.definitions import defs as load_definitions
from dagster_project.demo import run_demo
from pseudolabel.labels.thresholds import thresholds_path

LABELS, DETECTIONS, MASKS = AssetKey("pseudo_labels"), AssetKey("detections"), AssetKey("masks")


def labels_code_version(defs) -> str:
    return defs.get_assets_def(LABELS).code_versions_by_key[LABELS]


@pytest.fixture
def chain(tmp_path, monkeypatch):
    summary = run_demo(tmp_path / "demo", images=24, shard_size=8, models="fake")
    monkeypatch.setenv("PSEUDOLABEL_STORAGE", str(summary.data_root))
    monkeypatch.setenv("PSEUDOLABEL_MODELS", "fake")
    yield summary, DagsterInstance.from_config(str(summary.dagster_home))


def stale_resolver(instance, defs):
    return get_stale_status_resolver(instance, list(defs.assets))


def statuses(instance, defs, key, shards):
    resolver = stale_resolver(instance, defs)
    return {shard: resolver.get_status(key, shard) for shard in shards}


def materialization_runs(instance, key):
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1000).records
    return [(r.run_id, r.partition_key) for r in records]


def test_threshold_edit_backfill_relabels_every_shard_without_gpu_steps(chain, tmp_path, monkeypatch):
    summary, instance = chain
    shards = summary.shards
    defs = load_definitions()
    assert set(statuses(instance, defs, LABELS, shards).values()) == {StaleStatus.FRESH}
    old_fingerprint = labels_code_version(defs)

    edited = tmp_path / "thresholds.yaml"
    edited.write_text(thresholds_path({}).read_text().replace("mask_score: 0.70", "mask_score: 0.90"))
    monkeypatch.setenv("PSEUDOLABEL_THRESHOLDS", str(edited))
    defs = load_definitions()
    assert old_fingerprint != labels_code_version(defs)

    # The UI now shows every shard unsynced because of code version, and nothing upstream.
    resolver = stale_resolver(instance, defs)
    for shard in shards:
        assert resolver.get_status(LABELS, shard) == StaleStatus.STALE
        causes = resolver.get_stale_causes(LABELS, shard)
        assert {cause.category for cause in causes} == {StaleCauseCategory.CODE}
        assert resolver.get_status(DETECTIONS, shard) == StaleStatus.FRESH
        assert resolver.get_status(MASKS, shard) == StaleStatus.FRESH
    gpu_before = materialization_runs(instance, DETECTIONS) + materialization_runs(instance, MASKS)

    # What a backfill of pseudo_labels launches under its single-run policy: one run over the range.
    result = defs.resolve_job_def("relabel_job").execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: shards[0], ASSET_PARTITION_RANGE_END_TAG: shards[-1]},
    )
    assert result.success

    started = {e.step_key for e in instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_START)}
    assert started == {"pseudo_labels", "video_labels"}  # the label assets only: no GPU stage
    # No model worker was started: the chain's runs log one "starting model worker" line per GPU step.
    worker_lines = [
        e for e in instance.all_logs(result.run_id) if "starting model worker" in (e.message or "")
    ]
    assert worker_lines == []
    chain_runs = {run_id for run_id, _ in gpu_before}
    assert any("starting model worker" in (e.message or "") for r in chain_runs for e in instance.all_logs(r))
    relabelled = {p for run_id, p in materialization_runs(instance, LABELS) if run_id == result.run_id}
    assert relabelled == set(shards)
    assert materialization_runs(instance, DETECTIONS) + materialization_runs(instance, MASKS) == gpu_before
    assert set(statuses(instance, defs, LABELS, shards).values()) == {StaleStatus.FRESH}
    latest = instance.get_latest_materialization_event(LABELS).asset_materialization.metadata
    assert latest["thresholds"].value["mask_score"] == 0.9
