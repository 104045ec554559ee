"""``detections``: Grounding DINO candidates for every "ok" image of a shard (GPU)."""

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from dagster_project.policies import gpu_shard_asset_args
from pseudolabel import layout
from pseudolabel.markdown import markdown_image
from pseudolabel.models.detect_stage import DetectionSettings, detection_fingerprint, ok_images, run_detection
from pseudolabel.models.fingerprint import up_to_date
from pseudolabel.models.overlay import draw_boxes
from pseudolabel.models.report import model_metadata, throughput
from pseudolabel.storage import read_parquet, write_parquet
from resources.models import DetectorResource
from resources.storage import StorageResource

PREVIEW_BOXES = 10


class DetectionsConfig(Config):
    prompt: str = "plant ."
    one_prompt_per_class: bool = False  # "a . b ." runs as "a ." and "b ." (one pass each), merged
    box_floor: float = 0.05  # keep candidates above these; thresholds are applied downstream
    text_floor: float = 0.05
    max_candidates: int = 300  # per image
    skip_if_up_to_date: bool = False  # skip when the stored output has the same fingerprint


@asset(
    **gpu_shard_asset_args(),
    deps=["normalized_images"],
    kinds={"pytorch", "parquet"},
)
def detections(
    context: AssetExecutionContext,
    config: DetectionsConfig,
    storage: StorageResource,
    detector: DetectorResource,
) -> MaterializeResult:
    """Every Grounding DINO candidate above the score floors, per image of the shard, with box and text
    scores and phrase (detections/<shard>.parquet), and one row per image incl. zero-candidate ones
    (detections/<shard>.images.parquet)."""
    shard = context.partition_key
    store = storage.store()
    images = ok_images(read_parquet(store, layout.image_index(shard)))
    settings = DetectionSettings(
        prompt=config.prompt,
        one_prompt_per_class=config.one_prompt_per_class,
        box_floor=config.box_floor,
        text_floor=config.text_floor,
        max_candidates=config.max_candidates,
    )
    identity = detector.describe()
    fingerprint = detection_fingerprint(images, settings, identity)
    keys = [layout.detection_images(shard), layout.detections(shard)]
    if config.skip_if_up_to_date and up_to_date(store, keys, fingerprint):
        context.log.info(f"{shard}: detections up to date ({fingerprint[:12]}), skipped")
        return MaterializeResult(
            metadata={
                "skipped": True,
                "fingerprint": fingerprint,
                "path": MetadataValue.path(store.uri(keys[1])),
            }
        )

    result = run_detection(
        images,
        lambda image_id: store.get_bytes(layout.image(shard, image_id)),
        detector.detector(),
        settings,
        workers=detector.num_workers,
    )
    write_parquet(store, keys[0], result.images_table(fingerprint))  # images first: masks reads both
    write_parquet(store, keys[1], result.detections_table(fingerprint))

    metadata = {
        "images": len(result.images),
        "candidates": result.num_candidates,
        "zero_candidate_images": result.zero_candidate_images,
        "capped_images": result.capped_images,
        "img_per_s": throughput(len(result.images), result.seconds),
        "seconds": round(result.seconds, 3),
        "prompt": settings.prompt,
        "captions": " | ".join(settings.captions()),
        "box_floor": settings.box_floor,
        "text_floor": settings.text_floor,
        **model_metadata(identity),
        "fingerprint": fingerprint,
        "skipped": False,
        "path": MetadataValue.path(store.uri(keys[1])),
    }
    preview = next((found for found in result.images if len(found)), None)
    if preview is not None:
        labels = [f"{p} {s:.2f}" for p, s in zip(preview.phrases, preview.box_scores, strict=True)][
            :PREVIEW_BOXES
        ]
        png = draw_boxes(
            store.get_bytes(layout.image(shard, preview.image_id)), preview.boxes[:PREVIEW_BOXES], labels
        )
        metadata["preview"] = MetadataValue.md(
            markdown_image(png, f"{preview.image_id}: top {len(labels)} boxes")
        )
    return MaterializeResult(metadata=metadata)
