"""Group bookkeeping shared by NMS and the pick policies: sort once, then work on contiguous runs."""

from __future__ import annotations

import numpy as np


def group_order(groups: np.ndarray, *keys_desc: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices that sort rows by group, then each of ``keys_desc`` descending, then ``tiebreak`` ascending.

    The explicit tiebreak (e.g. candidate_id) makes every pick deterministic when scores tie.
    """
    keys: list[np.ndarray] = []
    if tiebreak is not None:
        keys.append(tiebreak)
    keys.extend(-np.asarray(k, dtype=np.float64) for k in reversed(keys_desc))
    keys.append(groups)
    return np.lexsort(keys)


def run_starts(sorted_groups: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in an already sorted array."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])


def positions_in_runs(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values (the rank after :func:`group_order`)."""
    n = len(sorted_groups)
    starts = run_starts(sorted_groups)
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, lengths)
