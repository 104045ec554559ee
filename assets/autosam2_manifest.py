"""``autosam2_manifest``: every materialised pseudo_labels shard -> AutoSAM2's training layout.

Writes a new version under autosam2/versions/<version>/ and then flips autosam2/CURRENT.json to it
(see :mod:`pseudolabel.dataset.publish` for the layout and why a trainer never sees a half-written
split). Point AutoSAM2 at the directory CURRENT.json's ``root`` names.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
from collections.abc import Iterator
from datetime import UTC, datetime

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.common import GateConfig, enforce_gates, gate_check_specs
from pseudolabel.dataset.collect import Collected, collect, labelled_shards
from pseudolabel.dataset.publish import PublishSummary, publish_dataset
from pseudolabel.dataset.samples import SampleSpec
from pseudolabel.labels.coco import category_names
from pseudolabel.labels.thresholds import thresholds_fingerprint
from pseudolabel.markdown import markdown_table
from pseudolabel.review.corrections import read_reviewed
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource


class AutoSam2ManifestConfig(GateConfig):
    width: int = Field(default=512, description="Sample width in pixels (images and masks are resized).")
    height: int = Field(default=512, description="Sample height in pixels.")
    jpeg_quality: int = Field(default=95, description="JPEG quality of the sample images.")
    train_fraction: float = Field(default=0.95, description="Share of each label's samples in train.")
    val_fraction: float = Field(default=0.04, description="Share of each label's samples in val.")
    test_fraction: float = Field(default=0.01, description="Share of each label's samples in test.")
    seed: int = Field(default=0, description="Seed of the split assignment (a seeded hash of the sample id).")
    include_empty: bool = Field(
        default=False,
        description="Also publish images with no kept instance, as all-black-mask samples (reviewed images "
        "are always included: 'nothing here' is a reviewer's verdict).",
    )
    keep_versions: int = Field(
        default=2,
        description="Versions kept: the new one plus this many - 1 previous ones, for readers mid-epoch.",
    )
    workers: int = Field(default=2, description="Threads rendering samples.")
    frame_stride: int = Field(
        default=10,
        description="Every frame_stride-th labelled frame of each video (video_labels shards) becomes a sample; "
        "0 = images only.",
    )


@asset(
    deps=["pseudo_labels", "video_labels"],
    group_name="labels",
    kinds={"json"},
    description=(
        "AutoSAM2 training set (samples/, binary_masks/, splits/, manifest.jsonl, coco.json) "
        "from all pseudo_labels shards in storage, plus every frame_stride-th labelled video frame of the "
        "video_labels shards; autosam2/CURRENT.json names the current version. Reviewed images carry the "
        "reviewers' masks (`verified`). Published only when the blocking quality gates pass."
    ),
    check_specs=gate_check_specs("autosam2_manifest"),
)
def autosam2_manifest(
    context: AssetExecutionContext,
    config: AutoSam2ManifestConfig,
    storage: StorageResource,
    thresholds: ThresholdsResource,
) -> Iterator[AssetCheckResult | MaterializeResult]:
    store = storage.store()
    reviewed = read_reviewed(store)
    collected = collect(store, frame_stride=config.frame_stride, reviewed=reviewed)
    for warning in collected.warnings:
        context.log.warning(warning)
    samples = collected.samples
    if not config.include_empty:  # reviewed images stay: "nothing here" is a reviewer's verdict
        samples = samples.loc[(samples["instance_count"] > 0) | samples["verified"]]
    fingerprints = sorted(samples["thresholds_fingerprint"].dropna().unique())
    yield from enforce_gates(store, samples, labelled_shards(store), reviewed, config)
    current = thresholds_fingerprint(thresholds.load())
    if fingerprints and fingerprints != [current]:
        context.log.warning(
            f"labels were made with thresholds {fingerprints}, the current file is {current}: "
            "materialise the unsynced pseudo_labels partitions first to train on the current thresholds"
        )
    context.log.info(
        f"{len(samples)} samples from {len(collected.shards)} shards "
        f"({len(collected.samples) - len(samples)} empty images skipped)"
    )

    version = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    summary = publish_dataset(
        store,
        samples.reset_index(drop=True),
        collected.instances,
        version=version,
        spec=SampleSpec(width=config.width, height=config.height, jpeg_quality=config.jpeg_quality),
        fractions={"train": config.train_fraction, "val": config.val_fraction, "test": config.test_fraction},
        seed=config.seed,
        workers=config.workers,
        keep_versions=config.keep_versions,
        info={
            "thresholds_fingerprints": fingerprints,
            "shards": collected.shards,
            "run_id": context.run_id,
            "categories": category_names(collected.instances["phrase"]) if len(collected.instances) else [],
        },
        log=context.log.info,
    )
    for failure in summary.failure_examples:
        context.log.warning(f"skipped sample {failure}")
    metadata = _metadata(store.uri(summary.root), summary, collected, samples, fingerprints)
    metadata["matches_current_thresholds"] = MetadataValue.bool(fingerprints == [current])
    metadata["video_frame_samples"] = MetadataValue.int(
        int(samples["source_key"].str.startswith("video_frames/").sum())
    )
    metadata["frame_stride"] = MetadataValue.int(config.frame_stride)
    metadata["verified_samples"] = MetadataValue.int(int(samples["verified"].sum()))
    yield MaterializeResult(metadata=metadata)


def _metadata(
    root_uri: str,
    summary: PublishSummary,
    collected: Collected,
    samples: pd.DataFrame,
    fingerprints: list[str],
) -> dict[str, object]:
    labels = samples["label"].fillna("").value_counts().rename_axis("label").reset_index(name="samples")
    return {
        "dagster/row_count": MetadataValue.int(summary.samples),
        "version": MetadataValue.text(summary.version),
        "dataset_root": MetadataValue.path(root_uri),
        "samples": MetadataValue.int(summary.samples),
        **{f"split_{name}": MetadataValue.int(size) for name, size in summary.split_sizes.items()},
        "shards": MetadataValue.int(len(collected.shards)),
        "images_seen": MetadataValue.int(len(collected.samples)),
        "empty_images_skipped": MetadataValue.int(len(collected.samples) - len(samples)),
        "render_failures": MetadataValue.int(summary.failures),
        "reused_samples": MetadataValue.int(summary.reused_samples),
        "duplicate_images": MetadataValue.int(collected.duplicate_images),
        "thresholds_fingerprints": MetadataValue.json(fingerprints),
        "deleted_versions": MetadataValue.json(summary.deleted_versions),
        "labels": MetadataValue.md(markdown_table(labels.head(50))),
    }
