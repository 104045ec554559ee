"""``pseudo_labels``: one shard's stored candidates + SAM2 masks, re-thresholded into labels.

The thresholds come from the ``thresholds`` resource when the step runs; the definitions stamp
their fingerprint on this asset as its ``code_version``, so editing the YAML (or pointing
``PSEUDOLABEL_THRESHOLDS`` elsewhere) marks every shard unsynced, and re-materialising only re-reads
stored Parquet, never Grounding DINO or SAM2.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import time

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.common import SINGLE_RUN, shard_partitions
from pseudolabel import layout
from pseudolabel.labels.candidates import read_candidates
from pseudolabel.labels.coco import (
    build_coco,
    category_names,
    check_rles,
    coco_problems,
    coco_to_bytes,
    coco_with_polygons,
    image_mask_fractions,
    load_coco,
    within,
)
from pseudolabel.labels.lineage import current_provenance, staleness, with_lineage
from pseudolabel.labels.picking import PolicyNeedsScore
from pseudolabel.labels.relabel import (
    REJECT_REASONS,
    RelabelResult,
    combine_results,
    decision_table,
    pseudo_labels_table,
    relabel_shard,
    score_histograms,
)
from pseudolabel.labels.thresholds import Thresholds
from pseudolabel.markdown import markdown_table
from pseudolabel.storage import ObjectStore, write_parquet
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource

CHECK_RLE = "rles_decode"
CHECK_COCO = "coco_loads"
CHECK_EMPTY = "empty_image_rate_in_bounds"
CHECK_COVERAGE = "mask_coverage_in_bounds"
CHECK_NO_EMPTY_MASKS = "no_empty_masks"
CHECK_CLASS_KEPT = "kept_fraction_per_class_in_bounds"
CHECK_LINEAGE = "labels_match_candidates"


class PseudoLabelsConfig(Config):
    write_polygons: bool = False  # also write pseudo_labels/<shard>.polygons.coco.json (decodes every mask)
    histogram_bins: int = 10
    # Bounds for the warning checks; they flag a suspicious shard, they do not block.
    min_empty_image_rate: float = 0.0
    max_empty_image_rate: float = 0.9
    min_mean_mask_fraction: float = 0.002  # mean union-mask fraction of labelled images
    max_mean_mask_fraction: float = 0.8
    # Per class (phrase): kept / candidates; a class kept almost never or almost always is suspicious.
    min_class_kept_fraction: float = 0.01
    max_class_kept_fraction: float = 0.95


@asset(
    partitions_def=shard_partitions,
    # Cheap and CPU-only: a backfill re-labels a whole range of shards in one run.
    backfill_policy=SINGLE_RUN,
    deps=["masks", "detections"],
    group_name="labels",
    kinds={"parquet", "json"},
    description=(
        "Thresholded pseudo-labels per shard: pseudo_labels/<shard>.parquet and .coco.json (RLE). "
        "The thresholds file's fingerprint is the code version."
    ),
    check_specs=[
        AssetCheckSpec(
            CHECK_RLE,
            asset="pseudo_labels",
            blocking=True,
            description="Every kept RLE decodes to its stored size and area.",
        ),
        AssetCheckSpec(
            CHECK_COCO,
            asset="pseudo_labels",
            blocking=True,
            description="The shard's COCO file loads with pycocotools and is consistent.",
        ),
        AssetCheckSpec(
            CHECK_EMPTY,
            asset="pseudo_labels",
            description="Share of images with no kept instance is within the configured bounds.",
        ),
        AssetCheckSpec(
            CHECK_COVERAGE,
            asset="pseudo_labels",
            description="Mean mask fraction of labelled images is within the configured bounds.",
        ),
        AssetCheckSpec(
            CHECK_NO_EMPTY_MASKS,
            asset="pseudo_labels",
            blocking=True,
            description="No kept instance has an empty mask.",
        ),
        AssetCheckSpec(
            CHECK_CLASS_KEPT,
            asset="pseudo_labels",
            description="Per class, the share of candidates kept is within the configured bounds.",
        ),
        AssetCheckSpec(
            CHECK_LINEAGE,
            asset="pseudo_labels",
            blocking=True,
            description="The labels were made from the detections and masks stored when they were written "
            "(the dataset's gate of the same name re-checks this before every publish).",
        ),
    ],
)
def pseudo_labels(
    context: AssetExecutionContext,
    config: PseudoLabelsConfig,
    storage: StorageResource,
    thresholds: ThresholdsResource,
) -> MaterializeResult:
    """Re-threshold every shard of the run (one shard, or a whole range in a single-run backfill)."""
    store = storage.store()
    rules = thresholds.load()
    shards = context.partition_keys
    started = time.perf_counter()
    results, coco_files, dropped_polygons, models, lineages = [], [], None, set(), {}
    for shard in shards:
        try:
            result, coco_bytes, dropped, lineage = _label_shard(store, shard, config, rules)
        except PolicyNeedsScore as exc:  # the thresholds ask for a score this detector never made
            raise Failure(description=f"{shard}: {exc}", allow_retries=False) from exc
        results.append(result)
        coco_files.append(coco_bytes)
        models.add((lineage.get("detector_model"), lineage.get("segmenter_model")))
        lineages[shard] = lineage
        if dropped is not None:
            dropped_polygons = (dropped_polygons or 0) + dropped
        context.log.info(
            f"{shard}: kept {result.num_kept} of {len(result.candidates)} candidates, "
            f"{result.num_images_labelled}/{result.num_images} images labelled ({result.fingerprint})"
        )
    relabel_s = time.perf_counter() - started
    combined = combine_results(results)
    checks, mean_fraction = _checks(config, combined, coco_files)
    checks.append(_lineage_check(store, shards, lineages))
    return MaterializeResult(
        metadata={
            **_metadata(config, store, shards, combined, relabel_s, mean_fraction, dropped_polygons),
            "thresholds": MetadataValue.json(rules.to_dict()),
            "thresholds_path": MetadataValue.path(str(thresholds.file())),
            # The models whose candidates these labels were made from (recorded in the labels' lineage).
            "candidate_models": MetadataValue.md(
                markdown_table(pd.DataFrame(sorted(models, key=str), columns=["detector", "segmenter"]))
            ),
        },
        check_results=checks,
    )


def _label_shard(
    store: ObjectStore, shard: str, config: PseudoLabelsConfig, thresholds: Thresholds
) -> tuple[RelabelResult, bytes, int | None, dict]:
    # The sidecars first: they are written before their outputs, so a change racing this read makes
    # the labels look stale, never current.
    lineage = current_provenance(store, shard)
    candidates = read_candidates(store, shard)
    detections, images = candidates.detections, candidates.images
    result = relabel_shard(detections, candidates.masks, thresholds, images)
    images = images.sort_values("image_id").assign(
        file_name=lambda f: [layout.image(shard, i) for i in f["image_id"]]
    )
    info = {"shard": shard, "thresholds_fingerprint": result.fingerprint, "thresholds": thresholds.to_dict()}
    coco = build_coco(result.kept, images, categories=category_names(detections["phrase"]), info=info)
    coco_bytes = coco_to_bytes(coco)
    table = with_lineage(pseudo_labels_table(result.kept, result.fingerprint), lineage)
    write_parquet(store, layout.pseudo_labels(shard), table)
    store.put_bytes(layout.pseudo_labels_coco(shard), coco_bytes)
    dropped_polygons = None
    if config.write_polygons:
        dropped_polygons = _write_polygons(store, shard, coco)
    else:  # a polygon export made with older thresholds must not outlive them
        store.delete(layout.pseudo_labels_polygons(shard))
    return result, coco_bytes, dropped_polygons, lineage


def _write_polygons(store: ObjectStore, shard: str, coco: dict) -> int:
    polygon_coco, dropped = coco_with_polygons(coco)
    store.put_bytes(layout.pseudo_labels_polygons(shard), coco_to_bytes(polygon_coco))
    return dropped


def _coco_errors(coco_bytes: bytes) -> list[str]:
    try:
        return coco_problems(load_coco(coco_bytes))
    except Exception as exc:  # any load failure is exactly what the check reports
        return [f"pycocotools failed to load the file: {exc!r}"]


def _checks(
    config: PseudoLabelsConfig, result: RelabelResult, coco_files: list[bytes]
) -> tuple[list[AssetCheckResult], float | None]:
    rle = check_rles(result.kept)
    coco_errors = [error for coco_bytes in coco_files for error in _coco_errors(coco_bytes)]
    fractions = image_mask_fractions(result.kept)
    mean_fraction = float(fractions.mean()) if len(fractions) else None
    empty_ok = within(result.empty_image_rate, config.min_empty_image_rate, config.max_empty_image_rate)
    # A shard with no labelled image has no coverage to judge; the empty-rate check covers it.
    coverage_ok = mean_fraction is None or within(
        mean_fraction, config.min_mean_mask_fraction, config.max_mean_mask_fraction
    )
    empty = result.kept.loc[result.kept["mask_area"] <= 0]
    classes = class_kept_fractions(result.candidates)
    off = classes.loc[
        (classes["kept_fraction"] < config.min_class_kept_fraction)
        | (classes["kept_fraction"] > config.max_class_kept_fraction)
    ]
    checks = [
        AssetCheckResult(
            check_name=CHECK_NO_EMPTY_MASKS,
            passed=empty.empty,
            metadata={
                "empty_masks": len(empty),
                "examples": "\n".join(f"{r.image_id}/{r.candidate_id}" for r in empty.head(20).itertuples()),
            },
        ),
        AssetCheckResult(
            check_name=CHECK_CLASS_KEPT,
            passed=off.empty,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "bounds": f"[{config.min_class_kept_fraction}, {config.max_class_kept_fraction}]",
                "classes": MetadataValue.md(markdown_table(classes) if len(classes) else "No candidates."),
                "out_of_bounds": MetadataValue.json(off["class"].tolist()),
            },
        ),
        AssetCheckResult(
            check_name=CHECK_RLE,
            passed=rle.passed,
            metadata={
                "checked": rle.checked,
                "failures": rle.num_failures,
                "examples": "\n".join(rle.failures),
            },
        ),
        AssetCheckResult(
            check_name=CHECK_COCO,
            passed=not coco_errors,
            metadata={"problems": len(coco_errors), "examples": "\n".join(coco_errors[:20])},
        ),
        AssetCheckResult(
            check_name=CHECK_EMPTY,
            passed=empty_ok,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "empty_image_rate": result.empty_image_rate,
                "bounds": f"[{config.min_empty_image_rate}, {config.max_empty_image_rate}]",
            },
        ),
        AssetCheckResult(
            check_name=CHECK_COVERAGE,
            passed=coverage_ok,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "mean_mask_fraction": mean_fraction,
                "median_mask_fraction": float(fractions.median()) if len(fractions) else None,
                "bounds": f"[{config.min_mean_mask_fraction}, {config.max_mean_mask_fraction}]",
            },
        ),
    ]
    return checks, mean_fraction


def _lineage_check(store: ObjectStore, shards: list[str], lineages: dict[str, dict]) -> AssetCheckResult:
    """Candidates re-written while the labels were being made (e.g. a masks run racing this one) show here."""
    changed = {
        shard: reason
        for shard in shards
        if (reason := staleness(lineages[shard], current_provenance(store, shard))) is not None
    }
    return AssetCheckResult(
        check_name=CHECK_LINEAGE,
        passed=not changed,
        metadata={"stale_shards": MetadataValue.json(changed), "shards": len(shards)},
    )


def class_kept_fractions(candidates: pd.DataFrame) -> pd.DataFrame:
    """Per class (phrase): candidates, kept and their ratio."""
    frame = pd.DataFrame(
        {"class": candidates["phrase"].fillna(""), "kept": candidates["decision"].astype(str) == "kept"}
    )
    table = frame.groupby("class")["kept"].agg(candidates="size", kept="sum").reset_index()
    table["kept_fraction"] = table["kept"] / table["candidates"]
    return table


def _metadata(
    config: PseudoLabelsConfig,
    store: ObjectStore,
    shards: list[str],
    result: RelabelResult,
    relabel_s: float,
    mean_fraction: float | None,
    dropped_polygons: int | None,
) -> dict[str, object]:
    metadata: dict[str, object] = {
        "dagster/row_count": MetadataValue.int(result.num_kept),
        "thresholds_fingerprint": MetadataValue.text(result.fingerprint),
        "candidates": MetadataValue.int(len(result.candidates)),
        "kept": MetadataValue.int(result.num_kept),
        "rejected": MetadataValue.int(sum(result.rejected.values())),
        **{f"rejected_{reason}": MetadataValue.int(result.rejected[reason]) for reason in REJECT_REASONS},
        "decisions": MetadataValue.md(markdown_table(decision_table(result))),
        "images": MetadataValue.int(result.num_images),
        "images_labelled": MetadataValue.int(result.num_images_labelled),
        "empty_image_rate": MetadataValue.float(round(result.empty_image_rate, 6)),
        "mean_mask_fraction": (
            MetadataValue.float(round(mean_fraction, 6))
            if mean_fraction is not None
            else MetadataValue.null()
        ),
        "score_histograms": MetadataValue.md(markdown_table(score_histograms(result, config.histogram_bins))),
        "relabel_s": MetadataValue.float(round(relabel_s, 3)),
        "shards": MetadataValue.int(len(shards)),
        "parquet": MetadataValue.path(store.uri(layout.pseudo_labels(shards[0]))),
        "coco": MetadataValue.path(store.uri(layout.pseudo_labels_coco(shards[0]))),
    }
    for score in ("box_score", "text_score"):  # NaN = the detector backend does not make this score
        if missing := int(result.candidates[score].isna().sum()):
            metadata[f"{score}_not_produced"] = MetadataValue.int(missing)
    if len(shards) > 1:  # a single-run backfill: the paths above are the first shard's
        metadata["shard_range"] = MetadataValue.text(f"{shards[0]} .. {shards[-1]}")
    if dropped_polygons is not None:
        metadata["polygons"] = MetadataValue.path(store.uri(layout.pseudo_labels_polygons(shards[0])))
        metadata["polygons_dropped_empty"] = MetadataValue.int(dropped_polygons)
    return metadata
