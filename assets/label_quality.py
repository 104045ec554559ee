"""``label_quality``: how well do the chain's labels match a gold set, per pick policy and threshold,
and which thresholds per class would reach a target precision?

Two gold sources. ``reviewed`` (the default): the instances reviewers accepted, corrected or added in
Label Studio (``reviewed_labels``); the chain's candidates of those images are already stored, so no model
runs. Per class, it proposes the box and mask thresholds that reach ``target_precision`` with the most
recall (:func:`pseudolabel.quality.precision.propose_thresholds`), writes them as a thresholds YAML next to
the report and plots each class's precision-recall curve with the chosen point; adopt it with
``pseudolabel thresholds adopt``. ``folder``: images and white-on-black masks in ``gold_dir``; a model worker runs the chain's detector and segmenter, with the same stage code and settings as
``detections`` and ``masks``, once over the gold images; this asset then re-thresholds those
candidates with the function ``pseudo_labels`` uses, for a grid of box and mask thresholds (the other
thresholds come from the current file). Reports mean IoU and contour-discounted IoU (see
:mod:`pseudolabel.quality.gold`) as a table and a plot; this is how thresholds get picked.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import io
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue, asset
from PIL import Image
from pydantic import Field

from pseudolabel import layout
from pseudolabel.labels.candidates import read_candidates
from pseudolabel.labels.relabel import ShardCandidates
from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.markdown import markdown_image, markdown_table
from pseudolabel.quality.gold import load_gold_set
from pseudolabel.quality.precision import (
    candidate_table,
    gold_matches,
    plot_precision_recall,
    propose_thresholds,
    thresholds_yaml,
)
from pseudolabel.quality.sweep import (
    best_per_policy,
    make_scorer,
    plot_sweep,
    scores_by_policy,
    threshold_sweep,
)
from pseudolabel.review.corrections import gold_instances, read_reviewed
from pseudolabel.rle import decode_union, rle_object
from pseudolabel.storage import ObjectStore, read_parquet, write_parquet
from pseudolabel.workers.task import GOLD_CANDIDATES, WorkerTask
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import ModelWorkersResource

GOLD_SOURCES = ("reviewed", "folder")


class LabelQualityConfig(Config):
    gold_source: str = Field(
        default="reviewed",
        description="`reviewed`: the reviewers' instances from Label Studio (reviewed_labels); `folder`: "
        "images/ and masks/ in gold_dir (the chain's models run over them).",
    )
    gold_dir: str = Field(
        default="",
        description="gold_source `folder` only: a folder with images/ and masks/ (same file stems; masks "
        "white on black).",
    )
    target_precision: float = Field(
        default=0.9, description="gold_source `reviewed`: the per-class precision the proposal must reach."
    )
    match_iou: float = Field(
        default=0.5, description="A candidate is correct when its mask has this IoU with a gold instance."
    )
    box_score_grid: list[float] = Field(
        default=[0.2, 0.25, 0.3, 0.35, 0.4, 0.5], description="Box score thresholds tried."
    )
    mask_score_grid: list[float] = Field(
        default=[0.5, 0.6, 0.7, 0.8, 0.9], description="Mask score thresholds tried."
    )
    policies: list[str] = Field(
        default=[p.value for p in PickPolicy], description="Pick policies compared in the IoU sweep."
    )
    contour_factor: float = Field(
        default=0.5, description="CD-IoU: weight of the gold contour band is (1 - factor); 0 = plain IoU."
    )
    contour_band_px: int = Field(
        default=3, description="CD-IoU: the band reaches this many pixels either side of the gold edge."
    )


@asset(
    deps=["reviewed_labels"],
    group_name="labels",
    kinds={"parquet"},
    description=(
        "How good the labels are against a gold set, and what to change. Gold: the instances reviewers "
        "accepted, corrected or added (`gold_source: reviewed`, no model runs) or a folder of images and "
        "masks (`gold_source: folder`). Reports mean IoU / contour-discounted IoU swept over box and mask "
        "thresholds, and with reviewed gold, **per class, the thresholds that reach `target_precision` with "
        "the most recall**, written as `thresholds.proposal.yaml` with a precision-recall plot. Adopt it "
        "with `pseudolabel thresholds adopt`, then relabel (no GPU)."
    ),
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
    if config.gold_source not in GOLD_SOURCES:
        raise Failure(
            description=f"gold_source must be one of {GOLD_SOURCES}, got {config.gold_source!r}",
            allow_retries=False,
        )
    store = storage.store()
    rules = thresholds.load()  # the grid's other thresholds and the "current thresholds" rows
    prefix = f"{layout.LABEL_QUALITY_ROOT}/{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    metadata: dict[str, object] = {}
    if config.gold_source == "reviewed":
        candidates, gold_masks, reviewed_gold = _reviewed_gold(store)
        metadata.update(_proposal(store, prefix, config, candidates, reviewed_gold, rules, thresholds))
        report_extra = {"gold_source": "reviewed", "reviewed_images": len(gold_masks)}
    else:
        if not config.gold_dir.strip():
            raise Failure(description="gold_source folder needs gold_dir", allow_retries=False)
        candidates, gold_masks, worker_metadata = _folder_gold(
            context, config, store, prefix, storage, detector, segmenter, stage_settings, model_workers
        )
        metadata.update(worker_metadata)
        report_extra = {
            "gold_source": "folder",
            "gold_dir": config.gold_dir,
            "detections": vars(stage_settings.detection()),
            "masks": vars(stage_settings.segmentation()),
        }
    scorer = make_scorer(candidates, gold_masks, config.contour_factor, config.contour_band_px)
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
        title=f"{len(gold_masks)} gold images, CD factor {config.contour_factor}, band {config.contour_band_px}px",
    )
    write_parquet(store, f"{prefix}/sweep.parquet", sweep)
    store.put_bytes(f"{prefix}/sweep.png", plot)
    store.put_json(
        f"{prefix}/report.json",
        {
            **report_extra,
            "thresholds": rules.to_dict(),
            "images": len(gold_masks),
            "contour_factor": config.contour_factor,
            "contour_band_px": config.contour_band_px,
            "current": current.to_dict("records"),
            "best_by_cd_iou": best.to_dict("records"),
            "sweep": sweep.to_dict("records"),
        },
    )
    return MaterializeResult(
        metadata={
            "gold_source": MetadataValue.text(config.gold_source),
            "gold_images": MetadataValue.int(len(gold_masks)),
            "candidates": MetadataValue.int(len(candidates.detections)),
            "current_thresholds": MetadataValue.md(markdown_table(current)),
            "best_by_cd_iou": MetadataValue.md(markdown_table(best)),
            "sweep": MetadataValue.md(markdown_table(sweep)),
            "plot": MetadataValue.path(store.uri(f"{prefix}/sweep.png")),
            # Inline so the UI shows it without storage access.
            "plot_preview": MetadataValue.md(markdown_image(plot, "sweep")),
            "report": MetadataValue.path(store.uri(f"{prefix}/report.json")),
            "thresholds": MetadataValue.json(rules.to_dict()),
            **metadata,
        }
    )


def _reviewed_gold(store: ObjectStore) -> tuple[ShardCandidates, dict[str, np.ndarray], pd.DataFrame]:
    """The stored candidates of every reviewed image, the union of its gold masks, and the gold rows."""
    reviewed = read_reviewed(store)
    if reviewed.empty:
        raise Failure(
            description="No reviewed labels yet: push a review_queue, review some tasks in Label Studio, and "
            "let label_studio_reviews_sensor materialize reviewed_labels (or use gold_source folder).",
            allow_retries=False,
        )
    gold = gold_instances(reviewed)
    parts = []
    for shard, rows in reviewed.groupby("shard"):
        stored = read_candidates(store, shard)
        ids = set(rows["image_id"])
        parts.append(
            ShardCandidates(
                detections=stored.detections.loc[stored.detections["image_id"].isin(ids)],
                images=stored.images.loc[stored.images["image_id"].isin(ids)],
                masks=stored.masks.loc[stored.masks["image_id"].isin(ids)],
            )
        )
    candidates = ShardCandidates(
        *(
            pd.concat([getattr(p, f) for p in parts], ignore_index=True)
            for f in ("detections", "images", "masks")
        )
    )
    sizes = candidates.images.set_index("image_id")[["height", "width"]]
    masks = {}
    for image_id, (height, width) in sizes.iterrows():
        rows = gold.loc[gold["image_id"] == image_id]
        rles = [rle_object(c, int(height), int(width)) for c in rows["rle_counts"]]
        masks[image_id] = decode_union(rles, int(height), int(width)).astype(bool)
    return candidates, masks, gold


def _proposal(
    store: ObjectStore,
    prefix: str,
    config: LabelQualityConfig,
    candidates: ShardCandidates,
    gold: pd.DataFrame,
    rules: Thresholds,
    thresholds: ThresholdsResource,
) -> dict[str, object]:
    """Per-class thresholds from the reviewed evidence: the proposal YAML, its table and its plot."""
    matches = gold_matches(candidate_table(candidates), gold, config.match_iou)
    proposal = propose_thresholds(
        candidates,
        matches["correct"],
        gold["phrase"].value_counts().to_dict(),
        rules,
        target_precision=config.target_precision,
        box_scores=config.box_score_grid,
        mask_scores=config.mask_score_grid,
        matched_gold=matches["gold_index"],
    )
    evidence = (
        f"{gold['image_id'].nunique()} reviewed images, {len(gold)} gold instances, target precision "
        f"{config.target_precision}, match IoU {config.match_iou}; base file {thresholds.file()}"
    )
    proposal_key = layout.label_quality_proposal(prefix)
    store.put_text(proposal_key, thresholds_yaml(proposal.thresholds, evidence))
    plot = plot_precision_recall(
        proposal.curves, proposal.table, title=f"target precision {config.target_precision}"
    )
    store.put_bytes(f"{prefix}/precision_recall.png", plot)
    write_parquet(store, f"{prefix}/precision_recall.parquet", proposal.curves)
    return {
        "proposal": MetadataValue.md(markdown_table(proposal.table)),
        "proposal_yaml": MetadataValue.path(store.uri(proposal_key)),
        "adopt_with": MetadataValue.text(f"pseudolabel thresholds adopt {store.uri(proposal_key)}"),
        "classes_reaching_target": MetadataValue.int(int(proposal.table["reached_target"].sum())),
        "precision_recall_preview": MetadataValue.md(markdown_image(plot, "precision-recall per class")),
        "proposed_thresholds": MetadataValue.json(proposal.thresholds.to_dict()),
    }


def _folder_gold(
    context: AssetExecutionContext,
    config: LabelQualityConfig,
    store: ObjectStore,
    prefix: str,
    storage: StorageResource,
    detector: DetectorResource,
    segmenter: SegmenterResource,
    stage_settings: StageSettingsResource,
    model_workers: ModelWorkersResource,
) -> tuple[ShardCandidates, dict[str, np.ndarray], dict[str, object]]:
    """Run the chain's detector and segmenter over the gold folder's images in a model worker."""
    gold = load_gold_set(config.gold_dir)
    if gold.unmatched:
        context.log.warning(f"{len(gold.unmatched)} gold files without a partner, e.g. {gold.unmatched[:5]}")
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
    metadata = {
        **worker_metadata,
        "detection_settings": MetadataValue.json(vars(detection)),
        "mask_settings": MetadataValue.json(vars(segmentation)),
    }
    return candidates, gold.masks, metadata
