"""The code location: every asset of the chain, its checks, jobs, schedules, sensors and resources."""

from dagster import Definitions, load_asset_checks_from_modules

import assets.autosam2_manifest
import assets.catalog_snapshot
import assets.detections
import assets.label_quality
import assets.masks
import assets.normalized_images
import assets.pseudo_labels
import assets.stratified_sample
from dagster_project.automation import catalog_growth_sensor, catalog_refresh_schedule, new_shards_sensor
from dagster_project.jobs import catalog_job, dataset_job, relabel_job, sample_increment_job, shard_chain_job
from dagster_project.k8s import executor_from_env
from dagster_project.resource_defs import resources_from_env

CHAIN_MODULES = [
    assets.catalog_snapshot,
    assets.stratified_sample,
    assets.normalized_images,
    assets.detections,
    assets.masks,
    assets.pseudo_labels,
    assets.autosam2_manifest,
    assets.label_quality,
]

ALL_ASSETS = [
    assets.catalog_snapshot.catalog_snapshot,
    assets.stratified_sample.stratified_sample,
    assets.normalized_images.normalized_images,
    assets.detections.detections,
    assets.masks.masks,
    assets.pseudo_labels.pseudo_labels,
    assets.autosam2_manifest.autosam2_manifest,
    assets.label_quality.label_quality,
]

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=load_asset_checks_from_modules(CHAIN_MODULES),
    jobs=[catalog_job, sample_increment_job, shard_chain_job, relabel_job, dataset_job],
    schedules=[catalog_refresh_schedule],
    sensors=[catalog_growth_sensor, new_shards_sensor],
    resources=resources_from_env(),
    executor=executor_from_env(),
)
