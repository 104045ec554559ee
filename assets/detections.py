"""``detections``: the detector backend's candidates for every "ok" image of a shard, in a model worker (GPU)."""

from dagster import AssetExecutionContext, MaterializeResult, asset

from assets.common import GpuStageConfig, gpu_shard_asset_args
from pseudolabel.models.stages import DETECTION_VERSION
from pseudolabel.workers.task import DETECTIONS, WorkerTask
from resources.models import DetectorResource, StageSettingsResource
from resources.storage import StorageResource
from resources.workers import ModelWorkersResource


class DetectionsConfig(GpuStageConfig):
    """The detections step's config (the models and prompt are resources)."""


# The stage version is the code version: bumping it shows every shard unsynced in the UI.
@asset(
    **gpu_shard_asset_args(),
    deps=["normalized_images"],
    code_version=DETECTION_VERSION,
    kinds={"pytorch", "parquet"},
)
def detections(
    context: AssetExecutionContext,
    config: DetectionsConfig,
    storage: StorageResource,
    detector: DetectorResource,
    stage_settings: StageSettingsResource,
    model_workers: ModelWorkersResource,
) -> MaterializeResult:
    """Every candidate of the ``detector`` backend (Grounding DINO by default; OWLv2, DINOv2 saliency,
    annotation files, SAM 3) above the score floors, per image of the shard, with box and text scores,
    phrase and any clicks (detections/<shard>.parquet), and one row per image incl. zero-candidate ones
    (detections/<shard>.images.parquet). Prompt and floors: the ``stage_settings`` resource. One model
    load serves every shard of the run."""
    task = WorkerTask(
        stage=DETECTIONS,
        shards=list(context.partition_keys),
        storage=storage.location(),
        settings=vars(stage_settings.detection()),
        detector=detector.spec().for_retry(context.retry_number).to_dict(),
        force=config.force,
    )
    model_workers.run(context, task, storage.worker_env())  # metadata goes onto each shard
    return MaterializeResult()
