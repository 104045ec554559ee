"""The catalog cursor, kept in Dagster: ``catalog_offset`` metadata of the latest ``stratified_sample``."""

from dagster import AssetKey, DagsterInstance

SAMPLE_KEY = AssetKey("stratified_sample")
CURSOR_METADATA_KEY = "catalog_offset"


def catalog_cursor(instance: DagsterInstance) -> int | None:
    """How far into the catalog the sample has looked (None: never sampled)."""
    event = instance.get_latest_materialization_event(SAMPLE_KEY)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(CURSOR_METADATA_KEY)
    return None if value is None else int(value.value)
