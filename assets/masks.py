"""``masks``: a mask (COCO RLE) for every detection candidate of a shard, in a model worker (GPU)."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.common import GpuStageConfig, gpu_shard_asset_args
from pseudolabel.models.stages import SEGMENTATION_VERSION
from pseudolabel.workers.task import MASKS, WorkerTask
from resources.models import SegmenterResource, StageSettingsResource
from resources.storage import StorageResource
from resources.workers import ModelWorkersResource


class MasksConfig(GpuStageConfig):
    """The masks step's config (the segmenter and its settings are resources)."""


# The stage version is the code version: bumping it shows every shard unsynced in the UI.
@asset(
    **gpu_shard_asset_args(),
    deps=["detections"],
    code_version=SEGMENTATION_VERSION,
    kinds={"pytorch", "parquet"},
)
def masks(
    context: AssetExecutionContext,
    config: MasksConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    stage_settings: StageSettingsResource,
    model_workers: ModelWorkersResource,
) -> MaterializeResult:
    """One mask per detection candidate from the ``segmenter`` backend (SAM2 by default, EdgeTAM, or the masks
    SAM 3 made while detecting), prompted by its box and/or clicks, as COCO RLE with area, bbox and predicted IoU
    (masks/<shard>.parquet); ``multimask`` from the ``stage_settings`` resource. One model load serves
    every shard of the run."""
    task = WorkerTask(
        stage=MASKS,
        shards=list(context.partition_keys),
        storage=storage.location(),
        settings=vars(stage_settings.segmentation()),
        segmenter=segmenter.spec().for_retry(context.retry_number).to_dict(),
        force=config.force,
    )
    model_workers.run(context, task, storage.worker_env())  # metadata goes onto each shard
    return MaterializeResult()
