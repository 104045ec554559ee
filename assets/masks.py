"""``masks``: a SAM2 mask (COCO RLE) for every detection candidate of a shard, in a model worker (GPU)."""

from dagster import AssetExecutionContext, Config, MaterializeResult, asset

from dagster_project.policies import gpu_shard_asset_args
from pseudolabel.models.segment_stage import SegmentationSettings
from pseudolabel.workers.task import MASKS, WorkerTask
from resources.models import SegmenterResource
from resources.storage import StorageResource
from resources.workers import ModelWorkersResource


class MasksConfig(Config):
    multimask: bool = False  # 3 masks per box; keep the best predicted IoU, store all 3 scores
    skip_if_up_to_date: bool = False  # skip shards whose stored output has the same fingerprint


@asset(**gpu_shard_asset_args(), deps=["detections"], kinds={"pytorch", "parquet"})
def masks(
    context: AssetExecutionContext,
    config: MasksConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
    model_workers: ModelWorkersResource,
) -> MaterializeResult:
    """One SAM2 mask per detection candidate (box prompt), as COCO RLE with area, bbox and predicted IoU
    (masks/<shard>.parquet). One model load serves every shard of the run."""
    task = WorkerTask(
        stage=MASKS,
        shards=list(context.partition_keys),
        storage=storage.location(),
        settings=vars(SegmentationSettings(multimask=config.multimask)),
        segmenter=segmenter.spec().for_retry(context.retry_number).to_dict(),
        skip_if_up_to_date=config.skip_if_up_to_date,
    )
    model_workers.run(context, task, storage.worker_env(secrets=True))  # metadata goes onto each shard
    return MaterializeResult()
