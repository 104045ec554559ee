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
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.common import gate_check_results
from pseudolabel.dataset.collect import Collected, collect, labelled_shards
from pseudolabel.dataset.gates import GATE_DESCRIPTIONS, GATES, dataset_gates
from pseudolabel.dataset.publish import PublishSummary, publish_dataset
from pseudolabel.dataset.samples import SampleSpec
from pseudolabel.labels.coco import category_names
from pseudolabel.labels.lineage import stale_shards
from pseudolabel.labels.thresholds import thresholds_fingerprint
from pseudolabel.markdown import markdown_table
from pseudolabel.review.corrections import kept_precision, read_reviewed
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource


class AutoSam2ManifestConfig(Config):
    width: int = 512
    height: int = 512
    jpeg_quality: int = 95
    train_fraction: float = 0.95
    val_fraction: float = 0.04
    test_fraction: float = 0.01
    seed: int = 0
    include_empty: bool = False  # images with no kept instance become all-black-mask samples
    # Shards labelled with different thresholds (e.g. a backfill still running) make a mixed
    # training set; refuse unless explicitly allowed.
    allow_mixed_thresholds: bool = False
    # The reviewed-precision gate: classes with at least min_reviewed reviewed kept instances in the
    # review queue's uniform sample must reach target_precision, or nothing is published.
    target_precision: float = 0.9
    min_reviewed: int = 20
    keep_versions: int = 2  # the new version plus this many - 1 previous ones, for readers mid-epoch
    workers: int = 2
    # Every frame_stride-th labelled frame of each video (video_labels shards) becomes a sample too;
    # 0 = images only.
    frame_stride: int = 10


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
    check_specs=[
        AssetCheckSpec(name, asset="autosam2_manifest", blocking=True, description=GATE_DESCRIPTIONS[name])
        for name in GATES
    ],
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
    gates = dataset_gates(
        samples,
        stale=stale_shards(store, labelled_shards(store)),
        precision=kept_precision(reviewed) if len(reviewed) else pd.DataFrame(),
        target_precision=config.target_precision,
        min_reviewed=config.min_reviewed,
        allow_mixed_thresholds=config.allow_mixed_thresholds,
    )
    yield from gate_check_results(gates)
    failed = [g for g in gates if not g.passed]
    if failed:
        raise Failure(
            description="Not published: " + "; ".join(f"{g.name}: {g.summary}" for g in failed),
            metadata={g.name: MetadataValue.json(g.details) for g in failed},
            allow_retries=False,
        )
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
