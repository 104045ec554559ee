"""The code location: every asset of the chain, its checks, jobs, schedules, sensors and resources.

Loaded lazily (``@definitions``): nothing is read from the environment or the thresholds file when the
module is imported, only when Dagster (or a test) builds the definitions.
"""

from dagster import (
    AssetKey,
    AssetSpec,
    Definitions,
    definitions,
    load_asset_checks_from_package_module,
    load_assets_from_package_module,
    map_asset_specs,
)

import assets
from dagster_project.automation import (
    catalog_growth_sensor,
    catalog_refresh_schedule,
    label_studio_reviews_sensor,
    new_shards_sensor,
)
from dagster_project.jobs import (
    catalog_job,
    dataset_job,
    relabel_job,
    review_job,
    sample_increment_job,
    shard_chain_job,
)
from dagster_project.resource_defs import executor_from_env, resources_from_env
from pseudolabel.labels.thresholds import load_thresholds, thresholds_code_version, thresholds_path

# Their outputs change exactly when the thresholds do: their code version is the thresholds' fingerprint.
THRESHOLD_VERSIONED = {AssetKey("pseudo_labels"), AssetKey("label_quality"), AssetKey("video_labels")}


@definitions
def defs() -> Definitions:
    version = thresholds_code_version(load_thresholds(thresholds_path()))

    def stamp(spec: AssetSpec) -> AssetSpec:
        return spec.replace_attributes(code_version=version) if spec.key in THRESHOLD_VERSIONED else spec

    return Definitions(
        assets=map_asset_specs(stamp, load_assets_from_package_module(assets)),
        asset_checks=load_asset_checks_from_package_module(assets),
        jobs=[catalog_job, sample_increment_job, shard_chain_job, relabel_job, dataset_job, review_job],
        schedules=[catalog_refresh_schedule],
        sensors=[catalog_growth_sensor, new_shards_sensor, label_studio_reviews_sensor],
        resources=resources_from_env(),
        executor=executor_from_env(),
    )
