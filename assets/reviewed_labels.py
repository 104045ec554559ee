"""``reviewed_labels``: what reviewers said in Label Studio, as instances the rest of the chain can use.

Reads every task of the review project whose annotation changed since the last materialization (the
cursor is kept in storage next to the table, so a failed run loses nothing: the next one starts from the
same place), turns each task's latest submitted annotation into accepted / corrected / rejected / added
instances (:mod:`pseudolabel.review.corrections`), and merges them into
``review/reviewed_labels.parquet`` (a task reviewed again replaces its rows). The accepted, corrected and
added instances are gold: ``label_quality`` scores the chain against them, and the AutoSAM2 dataset and
the exports carry them instead of the pseudo-labels of those images, flagged ``verified``.
``label_studio_reviews_sensor`` materializes it when reviewers submit.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from pseudolabel import layout
from pseudolabel.markdown import markdown_table
from pseudolabel.review.corrections import (
    OUTCOMES,
    kept_precision,
    merge_reviews,
    read_reviewed,
    reviewed_arrow,
    reviewed_table,
)
from pseudolabel.storage import ObjectNotFound, write_parquet
from resources.label_studio import LabelStudioResource
from resources.storage import StorageResource


@asset(
    deps=["review_queue"],
    group_name="review",
    kinds={"parquet"},
    description=(
        "Reviewers' verdicts from Label Studio, one row per instance: `accepted`, `corrected`, `rejected` "
        "or `added`, with the reviewer's mask (COCO RLE), reviewer and time, in "
        "`review/reviewed_labels.parquet`. Accepted, corrected and added instances are **gold**: "
        "`label_quality` measures the chain against them and the dataset and exports carry them as "
        "`verified`. Materialized by `label_studio_reviews_sensor` when reviewers submit."
    ),
)
def reviewed_labels(
    context: AssetExecutionContext, storage: StorageResource, label_studio: LabelStudioResource
) -> MaterializeResult:
    store = storage.store()
    try:
        state = store.get_json(layout.REVIEW_STATE)
    except ObjectNotFound:
        raise Failure(
            description="No review project yet: materialize review_queue first (it creates the Label Studio "
            "project and pushes the tasks).",
            allow_retries=False,
        ) from None
    client = label_studio.client()
    reviewed = client.reviewed_tasks(int(state["project_id"]), updated_after=state.get("reviewed_until"))
    new = reviewed_table(reviewed.tasks)
    table = merge_reviews(read_reviewed(store), new, [int(t["id"]) for t in reviewed.tasks])
    write_parquet(store, layout.REVIEWED_LABELS, reviewed_arrow(table))
    # The cursor moves only once the rows are stored.
    store.put_json(
        layout.REVIEW_STATE, {**state, "reviewed_until": reviewed.cursor or state.get("reviewed_until")}
    )
    context.log.info(
        f"{len(reviewed.tasks)} tasks reviewed since {state.get('reviewed_until') or 'the start'}"
    )

    outcomes = table["outcome"].value_counts().reindex(OUTCOMES, fill_value=0)
    precision = kept_precision(table) if len(table) else pd.DataFrame()
    return MaterializeResult(
        metadata={
            "dagster/row_count": MetadataValue.int(len(table)),
            "reviewed_images": MetadataValue.int(int(table["image_id"].nunique())),
            "tasks_updated_this_run": MetadataValue.int(len(reviewed.tasks)),
            **{f"instances_{name}": MetadataValue.int(int(count)) for name, count in outcomes.items()},
            "gold_instances": MetadataValue.int(int(outcomes[["accepted", "corrected", "added"]].sum())),
            "reviewers": MetadataValue.int(int(table["reviewer"].nunique())),
            "precision_by_class": MetadataValue.md(
                "Share of the chain's kept instances reviewers confirmed, on the uniform random sample "
                "(95 % Wilson interval):\n\n" + markdown_table(precision)
                if len(precision)
                else "No reviewed kept instance in the uniform sample yet."
            ),
            "reviewed_until": MetadataValue.text(str(reviewed.cursor or state.get("reviewed_until") or "")),
            "table": MetadataValue.path(store.uri(layout.REVIEWED_LABELS)),
        }
    )
