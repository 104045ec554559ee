"""``catalog_snapshot`` materialized through Dagster, on local storage and on S3 (moto)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from dagster import DagsterInstance, RunConfig, materialize

from assets.catalog_snapshot import CatalogSnapshotConfig, catalog_snapshot
from pseudolabel import layout
from pseudolabel.catalog import iter_current_parts, read_current, snapshot_ids
from pseudolabel.testing.catalogs import SyntheticCatalog
from pseudolabel.testing.servers import Fault
from resources.catalog import CatalogResource, catalog_from_env

SYNTHETIC = SyntheticCatalog(total=1_000, num_labels=5, duplicate_every=10)
BAD_ITEMS = [{"image_url": "ftp://x/1.jpg", "label": "oak"}, {"image_url": "https://x/2.jpg"}, "junk"]
TOKEN = "tok-3f9a-very-secret"


def run(storage_resource, catalog, **config):
    return materialize(
        [catalog_snapshot],
        resources={"storage": storage_resource, "catalog": catalog},
        run_config=RunConfig(ops={"catalog_snapshot": CatalogSnapshotConfig(**config)}),
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def materialization_metadata(result) -> dict:
    [materialization] = result.asset_materializations_for_node("catalog_snapshot")
    return {key: value.value for key, value in materialization.metadata.items()}


def assert_run_succeeded(result):
    """Fail with the step's own error (materialize only wraps it), so a failure says what broke."""
    for event in result.all_events:
        if event.is_step_failure:
            cause = event.step_failure_data.error
            while cause.cause is not None:
                cause = cause.cause
            raise AssertionError(cause.to_string())
    assert result.success


def test_materializes_rows_and_metadata(storage_resource, store, dev_server):
    server = dev_server(SYNTHETIC(0, SYNTHETIC.total) + BAD_ITEMS, required_token=TOKEN)
    server.inject("/api/trees?offset=500&", [Fault(status=503)])
    catalog = CatalogResource(source=server.catalog_url, token=TOKEN, page_size=100, backoff_s=0.01)

    result = run(storage_resource, catalog, chunk_rows=300)
    assert_run_succeeded(result)

    pointer = read_current(store)
    rows = pa.concat_tables(iter_current_parts(store))
    assert rows.num_rows == pointer["rows"] == SYNTHETIC.unique_urls()
    assert len(set(rows.column("url").to_pylist())) == rows.num_rows
    assert rows.column_names == ["url", "label", "source_id"]
    assert all(layout.catalog_snapshot_dir(pointer["snapshot_id"]) in key for key in pointer["parts"])
    assert max(len(part) for part in iter_current_parts(store)) <= 300

    metadata = materialization_metadata(result)
    assert metadata["rows"] == SYNTHETIC.unique_urls()
    assert metadata["pages"] == 11
    assert metadata["duplicate_urls_dropped"] == SYNTHETIC.total - SYNTHETIC.unique_urls()
    assert metadata["invalid_rows"] == 3
    for reason in ("url_not_http", "missing_label", "not_an_object"):
        assert reason in metadata["invalid_rows_by_reason"]
    assert metadata["malformed_pages"] == 0
    assert "| species_000 |" in metadata["label_histogram"]
    assert metadata["snapshot_path"].endswith(layout.catalog_snapshot_dir(pointer["snapshot_id"]))
    assert metadata["rows_per_s"] > 0 and metadata["elapsed_s"] > 0
    assert TOKEN not in str(metadata) and TOKEN not in store.get_text(layout.CATALOG_CURRENT)


def test_rematerializing_moves_the_pointer_and_prunes(storage_resource, store, tmp_path):
    first = tmp_path / "first.csv"
    first.write_text("image_url,label\nhttps://x/1.jpg,oak\nhttps://x/2.jpg,pine\n")
    assert_run_succeeded(run(storage_resource, CatalogResource(source=str(first))))
    old_id = read_current(store)["snapshot_id"]

    second = tmp_path / "second.jsonl"
    second.write_text('{"image_url": "https://x/3.jpg", "label": "elm", "id": 9}\n')
    assert_run_succeeded(run(storage_resource, CatalogResource(source=str(second)), keep_previous=0))
    pointer = read_current(store)
    assert pointer["snapshot_id"] != old_id
    assert snapshot_ids(store) == [pointer["snapshot_id"]]
    assert pa.concat_tables(iter_current_parts(store)).to_pylist() == [
        {"url": "https://x/3.jpg", "label": "elm", "source_id": "9"}
    ]


def test_a_failing_catalog_keeps_the_previous_snapshot(storage_resource, store, tmp_path, dev_server):
    good = tmp_path / "good.csv"
    good.write_text("image_url,label\nhttps://x/1.jpg,oak\n")
    assert_run_succeeded(run(storage_resource, CatalogResource(source=str(good))))
    before = read_current(store)

    server = dev_server(SYNTHETIC(0, 500))
    server.inject("/api/trees?offset=300&", [Fault(status=500)] * 10)
    catalog = CatalogResource(source=server.catalog_url, page_size=100, max_retries=1, backoff_s=0.01)
    result = run(storage_resource, catalog, chunk_rows=100)

    assert not result.success
    assert read_current(store) == before
    assert snapshot_ids(store) == [before["snapshot_id"]]  # the failed run's parts were removed


def test_unset_catalog_fails_with_how_to_set_it(storage_resource, monkeypatch):
    monkeypatch.delenv("PSEUDOLABEL_CATALOG", raising=False)
    result = run(storage_resource, catalog_from_env())
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "export PSEUDOLABEL_CATALOG=" in failure.step_failure_data.error.to_string()


def test_catalog_from_env_reads_source_and_token_without_exposing_the_token(monkeypatch, dev_server):
    server = dev_server([{"image_url": "https://x/1.jpg", "label": "oak"}], required_token=TOKEN)
    monkeypatch.setenv("PSEUDOLABEL_CATALOG", server.catalog_url)
    monkeypatch.setenv("PSEUDOLABEL_CATALOG_TOKEN", TOKEN)
    resource = catalog_from_env()
    assert TOKEN not in repr(resource)  # the UI shows the variable's name, not its value
    assert resource.process_config_and_initialize().fetch_total() == 1


def test_step_retries_only_for_a_server_that_kept_failing(tmp_path, dev_server):
    """A refused token is configuration (fail once); a catalog that kept answering 503 may recover."""
    from dagster import Failure
    from dagster._core.errors import DagsterMaxRetriesExceededError

    from resources.storage import LocalStorageResource

    storage = LocalStorageResource(root=str(tmp_path / "store"))
    refusing = dev_server(SYNTHETIC(0, 10), required_token=TOKEN)
    down = dev_server(SYNTHETIC(0, 10))
    down.inject("/api/trees?offset=0&", [Fault(status=503)] * 10)
    wrong_token = CatalogResource(source=refusing.catalog_url, token="wrong", backoff_s=0.01)
    kept_failing = CatalogResource(source=down.catalog_url, max_retries=1, backoff_s=0.01)
    # Not retryable: the step's Failure itself surfaces. Retryable: Dagster's retry policy takes over
    # (the suite sets its retries to 0, so it reports that the retries ran out).
    with pytest.raises(Failure) as caught:
        materialize([catalog_snapshot], resources={"storage": storage, "catalog": wrong_token})
    assert "HTTP 401" in caught.value.description and caught.value.allow_retries is False
    with pytest.raises(DagsterMaxRetriesExceededError, match="still answers HTTP 503"):
        materialize([catalog_snapshot], resources={"storage": storage, "catalog": kept_failing})
