"""``label_quality``: how well do the chain's labels match a gold set, per pick policy and threshold?

Runs the detector and segmenter once over the gold images, then re-thresholds those candidates
with the same function ``pseudo_labels`` uses for a grid of box and mask thresholds (the other
thresholds come from the current file). Reports mean IoU and contour-discounted IoU (see
:mod:`pseudolabel.quality.metrics`) as a table and a plot; this is how thresholds get picked.

Resources ``quality_detector`` / ``quality_segmenter`` implement the small protocols in
:mod:`pseudolabel.quality.candidates` (adapters over the real Grounding DINO / SAM2 resources).
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import base64
from datetime import UTC, datetime

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, ResourceParam, asset

from assets.pseudo_labels import CODE_VERSION, THRESHOLDS
from pseudolabel import layout
from pseudolabel.labels.thresholds import PickPolicy
from pseudolabel.markdown import markdown_table
from pseudolabel.quality.candidates import CandidateDetector, CandidateSegmenter, run_candidates
from pseudolabel.quality.gold import load_gold_set
from pseudolabel.quality.plot import plot_sweep
from pseudolabel.quality.sweep import best_per_policy, make_scorer, scores_by_policy, threshold_sweep
from pseudolabel.storage import write_parquet
from resources.storage import StorageResource


class LabelQualityConfig(Config):
    gold_dir: str  # folder with images/ and masks/ (same file stems; masks white on black)
    box_score_grid: list[float] = [0.2, 0.25, 0.3, 0.35, 0.4, 0.5]
    mask_score_grid: list[float] = [0.5, 0.6, 0.7, 0.8, 0.9]
    policies: list[str] = [p.value for p in PickPolicy]
    contour_factor: float = 0.5  # weight of the GT contour band is (1 - factor); 0 = plain IoU
    contour_band_px: int = 3  # band reaches this many pixels either side of the GT edge
    batch_size: int = 8


@asset(
    group_name="labels",
    code_version=CODE_VERSION,  # the "current thresholds" rows depend on the thresholds file
    kinds={"parquet"},
    description="Mean IoU / contour-discounted IoU of pseudo-labels vs a gold set, swept over box and mask thresholds.",
)
def label_quality(
    context: AssetExecutionContext,
    config: LabelQualityConfig,
    storage: StorageResource,
    quality_detector: ResourceParam[CandidateDetector],
    quality_segmenter: ResourceParam[CandidateSegmenter],
) -> MaterializeResult:
    store = storage.store()
    gold = load_gold_set(config.gold_dir)
    if gold.unmatched:
        context.log.warning(f"{len(gold.unmatched)} gold files without a partner, e.g. {gold.unmatched[:5]}")
    context.log.info(f"running detector + segmenter on {len(gold.images)} gold images")
    candidates = run_candidates(gold.images, quality_detector, quality_segmenter, config.batch_size)
    scorer = make_scorer(candidates, gold.masks, config.contour_factor, config.contour_band_px)

    sweep = threshold_sweep(
        candidates,
        scorer,
        THRESHOLDS,
        box_scores=config.box_score_grid,
        mask_scores=config.mask_score_grid,
        policies=config.policies,
    )
    current = scores_by_policy(candidates, scorer, THRESHOLDS, config.policies)
    best = best_per_policy(sweep)
    plot = plot_sweep(
        sweep,
        title=f"{len(gold.images)} gold images, CD factor {config.contour_factor}, band {config.contour_band_px}px",
    )

    prefix = f"{layout.LABEL_QUALITY_ROOT}/{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    write_parquet(store, f"{prefix}/sweep.parquet", sweep)
    store.put_bytes(f"{prefix}/sweep.png", plot)
    store.put_json(
        f"{prefix}/report.json",
        {
            "thresholds": THRESHOLDS.to_dict(),
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
            "plot_preview": MetadataValue.md(
                f"![sweep](data:image/png;base64,{base64.b64encode(plot).decode()})"
            ),
            "report": MetadataValue.path(store.uri(f"{prefix}/report.json")),
            "thresholds": MetadataValue.json(THRESHOLDS.to_dict()),
        }
    )
