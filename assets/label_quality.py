"""``label_quality``: how well do the chain's labels match a gold set, per pick policy and threshold?

A model worker runs the chain's detector and segmenter, with the same stage code and settings as
``detections`` and ``masks``, once over the gold images; this asset then re-thresholds those
candidates with the function ``pseudo_labels`` uses, for a grid of box and mask thresholds (the other
thresholds come from the current file). Reports mean IoU and contour-discounted IoU (see
:mod:`pseudolabel.quality.gold`) as a table and a plot; this is how thresholds get picked.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import io
from datetime import UTC, datetime

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from PIL import Image

from pseudolabel import layout
from pseudolabel.labels.relabel import ShardCandidates
from pseudolabel.labels.thresholds import PickPolicy
from pseudolabel.markdown import markdown_image, markdown_table
from pseudolabel.quality.gold import load_gold_set
from pseudolabel.quality.sweep import (
    best_per_policy,
    make_scorer,
    plot_sweep,
    scores_by_policy,
    threshold_sweep,
)
from pseudolabel.storage import read_parquet, write_parquet
from pseudolabel.workers.task import GOLD_CANDIDATES, WorkerTask
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import ModelWorkersResource


class LabelQualityConfig(Config):
    gold_dir: str  # folder with images/ and masks/ (same file stems; masks white on black)
    box_score_grid: list[float] = [0.2, 0.25, 0.3, 0.35, 0.4, 0.5]
    mask_score_grid: list[float] = [0.5, 0.6, 0.7, 0.8, 0.9]
    policies: list[str] = [p.value for p in PickPolicy]
    contour_factor: float = 0.5  # weight of the GT contour band is (1 - factor); 0 = plain IoU
    contour_band_px: int = 3  # band reaches this many pixels either side of the GT edge


@asset(
    group_name="labels",
    kinds={"parquet"},
    description="Mean IoU / contour-discounted IoU of pseudo-labels vs a gold set, swept over box and mask thresholds.",
)
def label_quality(
    context: AssetExecutionContext,
    config: LabelQualityConfig,
    storage: StorageResource,
    detector: DetectorResource,
    segmenter: SegmenterResource,
    stage_settings: StageSettingsResource,
    model_workers: ModelWorkersResource,
    thresholds: ThresholdsResource,
) -> MaterializeResult:
    store = storage.store()
    rules = thresholds.load()  # the grid's other thresholds and the "current thresholds" rows
    gold = load_gold_set(config.gold_dir)
    if gold.unmatched:
        context.log.warning(f"{len(gold.unmatched)} gold files without a partner, e.g. {gold.unmatched[:5]}")
    prefix = f"{layout.LABEL_QUALITY_ROOT}/{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    for image in gold.images:  # upright pixels, losslessly: the frame the gold masks are drawn in
        buffer = io.BytesIO()
        Image.fromarray(image.pixels).save(buffer, format="PNG")
        store.put_bytes(layout.label_quality_gold_image(prefix, image.image_id), buffer.getvalue())
    # The chain's own models and stage settings (the resources detections and masks use).
    detection, segmentation = stage_settings.detection(), stage_settings.segmentation()
    task = WorkerTask(
        stage=GOLD_CANDIDATES,
        shards=[prefix],
        storage=storage.location(),
        settings={"detections": vars(detection), "masks": vars(segmentation)},
        detector=detector.spec().to_dict(),
        segmenter=segmenter.spec().to_dict(),
    )
    context.log.info(f"running the chain's detector + segmenter on {len(gold.images)} gold images")
    worker_metadata = model_workers.run(context, task, storage.worker_env())[prefix]
    candidates = ShardCandidates(
        *(
            read_parquet(store, layout.label_quality_candidates(prefix, name)).to_pandas()
            for name in ("detections", "detection_images", "masks")
        )
    )
    scorer = make_scorer(candidates, gold.masks, config.contour_factor, config.contour_band_px)

    sweep = threshold_sweep(
        candidates,
        scorer,
        rules,
        box_scores=config.box_score_grid,
        mask_scores=config.mask_score_grid,
        policies=config.policies,
    )
    current = scores_by_policy(candidates, scorer, rules, config.policies)
    best = best_per_policy(sweep)
    plot = plot_sweep(
        sweep,
        title=f"{len(gold.images)} gold images, CD factor {config.contour_factor}, band {config.contour_band_px}px",
    )

    write_parquet(store, f"{prefix}/sweep.parquet", sweep)
    store.put_bytes(f"{prefix}/sweep.png", plot)
    store.put_json(
        f"{prefix}/report.json",
        {
            "thresholds": rules.to_dict(),
            "detections": vars(detection),
            "masks": vars(segmentation),
            "gold_dir": config.gold_dir,
            "images": len(gold.images),
            "contour_factor": config.contour_factor,
            "contour_band_px": config.contour_band_px,
            "current": current.to_dict("records"),
            "best_by_cd_iou": best.to_dict("records"),
            "sweep": sweep.to_dict("records"),
        },
    )
    return MaterializeResult(
        metadata={
            "gold_images": MetadataValue.int(len(gold.images)),
            "candidates": MetadataValue.int(len(candidates.detections)),
            "current_thresholds": MetadataValue.md(markdown_table(current)),
            "best_by_cd_iou": MetadataValue.md(markdown_table(best)),
            "sweep": MetadataValue.md(markdown_table(sweep)),
            "plot": MetadataValue.path(store.uri(f"{prefix}/sweep.png")),
            # Inline so the UI shows it without storage access.
            "plot_preview": MetadataValue.md(markdown_image(plot, "sweep")),
            "report": MetadataValue.path(store.uri(f"{prefix}/report.json")),
            "thresholds": MetadataValue.json(rules.to_dict()),
            "detection_settings": MetadataValue.json(vars(detection)),
            "mask_settings": MetadataValue.json(vars(segmentation)),
            **worker_metadata,
        }
    )
