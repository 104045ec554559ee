"""``detections``: Grounding DINO candidates for every "ok" image of a shard, in a model worker (GPU)."""

from dagster import AssetExecutionContext, Config, MaterializeResult, asset

from dagster_project.policies import gpu_shard_asset_args
from pseudolabel.models.detect_stage import DetectionSettings
from pseudolabel.workers.task import DETECTIONS, WorkerTask
from resources.models import DetectorResource
from resources.storage import StorageResource
from resources.workers import ModelWorkersResource


class DetectionsConfig(Config):
    prompt: str = "plant ."
    one_prompt_per_class: bool = False  # "a . b ." runs as "a ." and "b ." (one pass each), merged
    box_floor: float = 0.05  # keep candidates above these; thresholds are applied downstream
    text_floor: float = 0.05
    max_candidates: int = 300  # per image
    skip_if_up_to_date: bool = False  # skip shards whose stored output has the same fingerprint

    def settings(self) -> DetectionSettings:
        return DetectionSettings(
            prompt=self.prompt,
            one_prompt_per_class=self.one_prompt_per_class,
            box_floor=self.box_floor,
            text_floor=self.text_floor,
            max_candidates=self.max_candidates,
        )


@asset(**gpu_shard_asset_args(), deps=["normalized_images"], kinds={"pytorch", "parquet"})
def detections(
    context: AssetExecutionContext,
    config: DetectionsConfig,
    storage: StorageResource,
    detector: DetectorResource,
    model_workers: ModelWorkersResource,
) -> MaterializeResult:
    """Every Grounding DINO candidate above the score floors, per image of the shard, with box and text
    scores and phrase (detections/<shard>.parquet), and one row per image incl. zero-candidate ones
    (detections/<shard>.images.parquet). One model load serves every shard of the run."""
    task = WorkerTask(
        stage=DETECTIONS,
        shards=list(context.partition_keys),
        storage=storage.location(),
        settings=vars(config.settings()),
        detector=detector.spec().for_retry(context.retry_number).to_dict(),
        skip_if_up_to_date=config.skip_if_up_to_date,
    )
    model_workers.run(context, task, storage.worker_env(secrets=True))  # metadata goes onto each shard
    return MaterializeResult()
