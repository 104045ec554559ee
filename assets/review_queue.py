"""``review_queue``: choose what a person should look at, and push it to Label Studio.

Per class: a uniform random sample of labelled images (the unbiased precision estimate) plus the most
informative candidates (kept or dropped nearest a threshold; scores that disagree), see
:mod:`pseudolabel.review.queue`. Every labelled shard's stored candidates are re-thresholded with the
current thresholds file (CPU only, no model runs). The Label Studio project and its labelling config are
created or updated for the classes; tasks carry the chain's proposals as predictions and are keyed by image
id, so re-materializing never duplicates a task.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
from datetime import UTC, datetime

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from pseudolabel import layout
from pseudolabel.dataset.collect import labelled_shards
from pseudolabel.exports.label_studio import label_config
from pseudolabel.labels.candidates import read_candidates
from pseudolabel.labels.coco import category_names
from pseudolabel.labels.lineage import current_provenance
from pseudolabel.labels.relabel import relabel_shard
from pseudolabel.labels.thresholds import Thresholds, thresholds_fingerprint
from pseudolabel.markdown import markdown_table
from pseudolabel.review.queue import QueueSizes, ReviewSelector
from pseudolabel.review.tasks import REVIEW_KEY, review_tasks
from pseudolabel.storage import ObjectNotFound, ObjectStore, write_parquet
from resources.label_studio import LabelStudioResource
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource

MASK_FORMATS = ("brush", "polygon")


class ReviewQueueConfig(Config):
    uniform_per_class: int = Field(
        default=20, description="Images per class drawn uniformly at random (the unbiased precision sample)."
    )
    near_threshold_per_class: int = Field(
        default=10, description="Candidates per class, kept or dropped, whose scores are nearest a threshold."
    )
    disagreement_per_class: int = Field(
        default=5, description="Candidates per class whose box/text/mask scores disagree most."
    )
    seed: int = Field(
        default=0, description="Seed of the uniform sample (the same seed draws the same images)."
    )
    mask_format: str = Field(
        default="brush",
        description="How masks appear in Label Studio: `brush` (editable pixels) or `polygon`.",
    )
    shards: list[str] = Field(default=[], description="Shards to choose from; empty = every labelled shard.")


def _candidates(store: ObjectStore, shard: str, rules: Thresholds) -> pd.DataFrame:
    """The shard's candidates re-thresholded with ``rules`` (each with its ``decision``)."""
    stored = read_candidates(store, shard)
    return relabel_shard(stored.detections, stored.masks, rules, stored.images).candidates


@asset(
    deps=["pseudo_labels"],
    group_name="review",
    kinds={"parquet"},
    description=(
        "Chooses images for human review, per class: a **uniform random sample** (for an unbiased precision "
        "estimate) plus the **most informative** candidates (nearest a threshold; disagreeing scores), and "
        "pushes them as tasks with pre-annotations to the Label Studio project (`PSEUDOLABEL_LABEL_STUDIO_URL`). "
        "Re-materializing never duplicates a task. CPU only."
    ),
)
def review_queue(
    context: AssetExecutionContext,
    config: ReviewQueueConfig,
    storage: StorageResource,
    thresholds: ThresholdsResource,
    label_studio: LabelStudioResource,
) -> MaterializeResult:
    if config.mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {config.mask_format!r}")
    store = storage.store()
    rules = thresholds.load()
    client = label_studio.client()  # fails here, before any work, when Label Studio is not configured
    shards = config.shards or labelled_shards(store)
    sizes = QueueSizes(
        config.uniform_per_class, config.near_threshold_per_class, config.disagreement_per_class
    )
    selector = ReviewSelector(sizes, config.seed)
    phrases: set[str] = set()
    for shard in shards:
        candidates = _candidates(store, shard, rules)
        phrases.update(candidates["phrase"].fillna(""))
        selector.add_shard(shard, candidates, rules)
    queue = selector.queue()
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    write_parquet(store, layout.review_queue(version), queue)

    classes = category_names(phrases)
    project_id = client.ensure_project(label_studio.project_title, label_config(classes, config.mask_format))
    storage_path = label_studio.local_storage_path(store, "images/")
    if storage_path:
        client.ensure_local_storage(project_id, storage_path, title="pseudolabel images")
    fingerprint = thresholds_fingerprint(rules)
    tasks = []
    for shard, items in queue.groupby("shard", sort=True):  # a second pass over the shards with items only
        lineage = current_provenance(store, shard)
        tasks += review_tasks(
            items,
            _candidates(store, shard, rules),
            image_url=lambda s, i: label_studio.image_url(store, layout.image(s, i)),
            model_version=f"{lineage.get('detector_model')} + {lineage.get('segmenter_model')}",
            thresholds_fingerprint=fingerprint,
            mask_format=config.mask_format,
        )
    imported = client.import_tasks(project_id, tasks, key=REVIEW_KEY)
    store.put_json(
        layout.REVIEW_STATE,
        {**_state(store), "project_id": project_id, "project_title": label_studio.project_title},
    )
    context.log.info(f"{len(tasks)} tasks: {imported.created} new, {imported.skipped} already in the project")
    per_class = queue.groupby(["phrase", "reason"]).size().unstack(fill_value=0).reset_index()
    return MaterializeResult(
        metadata={
            "dagster/row_count": MetadataValue.int(len(queue)),
            "images_queued": MetadataValue.int(int(queue["image_id"].nunique()) if len(queue) else 0),
            "tasks_created": MetadataValue.int(imported.created),
            "tasks_already_in_project": MetadataValue.int(imported.skipped),
            "shards_scanned": MetadataValue.int(len(shards)),
            "classes": MetadataValue.json(classes),
            "queue_by_class_and_reason": MetadataValue.md(
                markdown_table(per_class) if len(per_class) else "Nothing to review."
            ),
            "thresholds_fingerprint": MetadataValue.text(fingerprint),
            "project": MetadataValue.url(f"{label_studio.url.rstrip('/')}/projects/{project_id}"),
            "queue": MetadataValue.path(store.uri(layout.review_queue(version))),
        }
    )


def _state(store: ObjectStore) -> dict:
    try:
        return store.get_json(layout.REVIEW_STATE)
    except ObjectNotFound:  # the first run
        return {}
