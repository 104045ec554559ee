"""The threshold sweep as one PNG: a column per pick policy, IoU and CD-IoU rows, a line per box threshold."""

from __future__ import annotations

import io

import pandas as pd


def plot_sweep(sweep: pd.DataFrame, title: str = "") -> bytes:
    """PNG bytes. Uses a bare Agg Figure (no pyplot state), so it is safe in any process or thread."""
    # matplotlib costs ~50 MB and a fraction of a second: paid when a sweep is drawn, not by every
    # process that loads the code location.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    policies = list(dict.fromkeys(sweep["policy"]))
    metrics = [("mean_iou", "mean IoU"), ("mean_cd_iou", "mean CD-IoU")]
    figure = Figure(figsize=(4.2 * max(len(policies), 1), 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), max(len(policies), 1), squeeze=False, sharex=True, sharey=True)
    for col, policy in enumerate(policies):
        rows = sweep[sweep["policy"] == policy]
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for box_score, line in rows.groupby("box_score"):
                line = line.sort_values("mask_score")
                ax.plot(line["mask_score"], line[metric], marker="o", label=f"box >= {box_score:g}")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(policy)
            if row == len(metrics) - 1:
                ax.set_xlabel("mask score threshold")
            if col == 0:
                ax.set_ylabel(label)
    if policies:
        axes[0][0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
