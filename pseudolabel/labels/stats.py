"""Summaries of a re-labelling run, shaped for run metadata (plain values and Markdown tables)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from pseudolabel.labels.relabel import KEPT, RelabelResult

SCORE_COLUMNS = ("box_score", "text_score", "mask_score")


def score_histograms(result: RelabelResult, bins: int = 10) -> pd.DataFrame:
    """Counts per score bin on [0, 1] for all candidates and for kept ones: one row per bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    candidates = result.candidates
    kept = candidates["decision"].to_numpy() == KEPT
    table = {
        "bin": [
            f"[{lo:.2f}, {hi:.2f}{']' if i == bins - 1 else ')'}"
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ]
    }
    for column in SCORE_COLUMNS:
        values = candidates[column].to_numpy(dtype=np.float64, na_value=np.nan)
        table[f"{column} all"] = np.histogram(values[np.isfinite(values)], bins=edges)[0]
        kept_values = values[kept & np.isfinite(values)]
        table[f"{column} kept"] = np.histogram(kept_values, bins=edges)[0]
    return pd.DataFrame(table)


def decision_table(result: RelabelResult) -> pd.DataFrame:
    rows: Mapping[str, int] = {KEPT: result.num_kept, **result.rejected}
    total = max(sum(rows.values()), 1)
    return pd.DataFrame(
        {
            "decision": list(rows),
            "candidates": list(rows.values()),
            "share": [count / total for count in rows.values()],
        }
    )
