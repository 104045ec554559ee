"""``dataset_exports``: the current dataset version in the formats people train with.

Takes the images and splits of the AutoSAM2 version ``autosam2/CURRENT.json`` names (so every format
has exactly the same samples and splits), streams the labels shard by shard, with reviewers' masks on
the reviewed images (``verified``), and publishes a new export version atomically
(``exports/CURRENT.json``): COCO instance segmentation (``annotations/``), Ultralytics YOLO-seg
(``images/``, ``labels/``, ``data.yaml``) and Label Studio tasks with predictions (``label_studio/``).
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.common import GateConfig, enforce_gates, gate_check_specs
from pseudolabel.dataset.collect import collect_shard
from pseudolabel.dataset.publish import read_current
from pseudolabel.exports.publish import FORMATS, ExportBatch, export_dataset
from pseudolabel.labels.coco import category_names
from pseudolabel.markdown import markdown_table
from pseudolabel.review.corrections import read_reviewed
from pseudolabel.storage import ObjectStore
from resources.label_studio import LabelStudioResource
from resources.storage import StorageResource

VERIFIED_MODEL_VERSION = "human-verified"


class DatasetExportsConfig(GateConfig):
    formats: list[str] = Field(
        default=list(FORMATS), description=f"Formats to write, any of {', '.join(FORMATS)}."
    )
    coco_segmentation: str = Field(
        default="rle", description="COCO masks as `rle` (exact) or `polygon` (outer outlines, holes filled)."
    )
    label_studio_masks: str = Field(
        default="brush", description="Label Studio predictions as `brush` masks or `polygon` outlines."
    )
    keep_versions: int = Field(default=2, description="Export versions kept (the new one included).")


def _manifest(store: ObjectStore) -> tuple[dict, pd.DataFrame]:
    current = read_current(store)
    if not current:
        raise Failure(
            description="No AutoSAM2 dataset version yet: materialize autosam2_manifest first (the exports "
            "take its samples and splits).",
            allow_retries=False,
        )
    lines = store.get_text(f"{current['root']}/manifest.jsonl").splitlines()
    return current, pd.DataFrame([json.loads(line) for line in lines if line])


def _batches(store: ObjectStore, manifest: pd.DataFrame, reviewed: pd.DataFrame) -> Iterator[ExportBatch]:
    """One batch per shard of the dataset version, its labels as the dataset has them."""
    by_shard = dict(tuple(reviewed.groupby("shard"))) if len(reviewed) else {}
    for shard, rows in manifest.groupby("shard", sort=True):
        samples, instances = collect_shard(store, shard, by_shard.get(shard))
        images = samples.merge(rows[["id", "split"]], left_on="image_id", right_on="id")
        images["model_version"] = [
            VERIFIED_MODEL_VERSION if verified else f"{detector} + {segmenter} (thresholds {thresholds})"
            for verified, detector, segmenter, thresholds in zip(
                images["verified"],
                images["detector_model"],
                images["segmenter_model"],
                images["thresholds_fingerprint"],
                strict=True,
            )
        ]
        yield ExportBatch(
            images=images[["image_id", "split", "source_key", "width", "height", "model_version"]],
            instances=instances.loc[instances["image_id"].isin(set(images["image_id"]))],
        )


@asset(
    deps=["autosam2_manifest", "reviewed_labels"],
    group_name="labels",
    kinds={"json"},
    description=(
        "The current dataset version as **COCO** instance segmentation (`annotations/instances_<split>.json`, "
        "RLE or polygons; CVAT's COCO 1.0 and FiftyOne import it), **Ultralytics YOLO-seg** (`images/`, "
        "`labels/`, `data.yaml`) and **Label Studio** tasks with predictions (`label_studio/`), with the "
        "AutoSAM2 version's samples and splits; reviewed images carry the reviewers' masks. Published "
        "atomically: `exports/CURRENT.json` names the version. Stopped by a failing quality gate."
    ),
    check_specs=gate_check_specs("dataset_exports"),
)
def dataset_exports(
    context: AssetExecutionContext,
    config: DatasetExportsConfig,
    storage: StorageResource,
    label_studio: LabelStudioResource,
) -> Iterator[AssetCheckResult | MaterializeResult]:
    store = storage.store()
    current, manifest = _manifest(store)
    frames = manifest["source_key"].fillna("").str.startswith("video_frames/")
    if frames.any():
        context.log.warning(f"{int(frames.sum())} video frame samples are not exported (image samples only)")
    manifest = manifest.loc[~frames]
    reviewed = read_reviewed(store)
    samples = manifest.rename(columns={"id": "image_id"})
    yield from enforce_gates(store, samples, sorted(manifest["shard"].unique()), reviewed, config)

    categories = current.get("info", {}).get("categories") or category_names([])
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    summary = export_dataset(
        store,
        _batches(store, manifest, reviewed),
        version=version,
        categories=categories,
        image_url=lambda key: _image_url(label_studio, store, key),
        formats=tuple(config.formats),
        coco_segmentation=config.coco_segmentation,
        label_studio_masks=config.label_studio_masks,
        info={"dataset_version": current["version"], "run_id": context.run_id},
        keep_versions=config.keep_versions,
        log=context.log.info,
    )
    metadata = _metadata(store, summary, current)
    metadata["video_frame_samples_not_exported"] = MetadataValue.int(int(frames.sum()))
    yield MaterializeResult(metadata=metadata)


def _image_url(label_studio: LabelStudioResource, store: ObjectStore, key: str) -> str:
    """Where Label Studio loads an exported task's image: through the configured Label Studio access when
    there is one, else the store's own location (a path or s3:// URI, for import scripts to rewrite)."""
    try:
        return label_studio.image_url(store, key)
    except ValueError:
        return store.uri(key)


def _metadata(store: ObjectStore, summary, current: dict) -> dict[str, object]:
    splits = pd.DataFrame([{"split": split, "images": count} for split, count in summary.images.items()])
    dropped = pd.DataFrame(
        [{"reason": reason, "instances": count} for reason, count in summary.dropped.items()],
        columns=["reason", "instances"],
    )
    return {
        "version": MetadataValue.text(summary.version),
        "export_root": MetadataValue.path(store.uri(summary.root)),
        "dataset_version": MetadataValue.text(current["version"]),
        "images_by_split": MetadataValue.md(markdown_table(splits)),
        "instances_by_format": MetadataValue.json(summary.instances),
        "dropped_instances": MetadataValue.md(
            markdown_table(dropped) if len(dropped) else "None: every instance is in every format."
        ),
        "export_s": MetadataValue.float(round(summary.seconds, 3)),
    }
