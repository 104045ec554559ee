"""Human-readable summaries of a snapshot (markdown tables for the Dagster UI, plain text elsewhere)."""

from __future__ import annotations

from collections.abc import Mapping

from pseudolabel.catalog.tally import ReasonTally

TOP_LABELS = 20


def label_histogram_markdown(histogram: Mapping[str, int], top: int = TOP_LABELS) -> str:
    total = sum(histogram.values())
    ranked = sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = ["| label | rows | share |", "| --- | ---: | ---: |"]
    for label, count in ranked[:top]:
        lines.append(f"| {_cell(label)} | {count:,} | {count / total:.1%} |")
    if len(ranked) > top:
        rest = sum(count for _, count in ranked[top:])
        lines.append(f"| *{len(ranked) - top} other labels* | {rest:,} | {rest / total:.1%} |")
    return "\n".join(lines)


def reasons_markdown(tally: ReasonTally, what: str = "rows") -> str:
    """Counts by reason with a few examples each (offset: value)."""
    if not tally.total:
        return f"No invalid {what}."
    lines = ["| reason | count | examples |", "| --- | ---: | --- |"]
    for reason, count in tally.counts.most_common():
        examples = "<br>".join(
            f"@{example['offset']}: `{_cell(example['value'])}`" for example in tally.examples.get(reason, [])
        )
        lines.append(f"| {reason} | {count:,} | {examples} |")
    return "\n".join(lines)


def _cell(text: object) -> str:
    # Pipes and newlines would break the table; backticks would break the inline code span.
    return str(text).replace("|", "\\|").replace("\n", " ").replace("`", "'")
