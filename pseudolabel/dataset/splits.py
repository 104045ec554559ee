"""Seeded, label-stratified train/val/test assignment.

Within each label, samples are ordered by a seeded hash of their id (not by a random draw), so the
assignment depends only on (seed, the set of ids): re-runs reproduce it exactly, and adding shards
moves only samples near the split boundaries instead of reshuffling everything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.95, "val": 0.04, "test": 0.01}


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` (counts sum to ``n``; ties favour earlier splits)."""
    exact = np.array([n * fractions[s] for s in SPLITS], dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    by_fraction = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_fraction[:remainder]:
        counts[i] += 1
    return dict(zip(SPLITS, counts.tolist(), strict=True))


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS):
        raise ValueError(f"split fractions need exactly {SPLITS}, got {sorted(fractions)}")
    if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    return {s: float(fractions[s]) for s in SPLITS}


def _hash_key(seed: int, sample_id: str) -> str:
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def assign_splits(
    ids: Sequence[str],
    labels: Sequence[str | None],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pd.Series:
    """Split name per id (a Series indexed like ``ids``), stratified by label.

    Per label: test takes the first ``round(n * test)`` ids in seeded-hash order, val the next
    ``round(n * val)``, train the rest (largest-remainder rounding, so a label with 10 samples at
    95/4/1 goes entirely to train rather than leaking a 1-sample test set).
    """
    fractions = validate_fractions(fractions)
    frame = pd.DataFrame({"id": list(ids), "label": [label or "" for label in labels]})
    if frame["id"].duplicated().any():
        raise ValueError("sample ids must be unique")
    frame["key"] = [_hash_key(seed, i) for i in frame["id"]]
    frame = frame.sort_values(["label", "key"])
    split = np.empty(len(frame), dtype=object)
    position = frame.groupby("label", sort=False).cumcount().to_numpy()
    sizes = frame.groupby("label", sort=False)["id"].transform("size").to_numpy()
    for n in np.unique(sizes):
        counts = split_counts(int(n), fractions)
        rows = sizes == n
        split[rows] = np.where(
            position[rows] < counts["test"],
            "test",
            np.where(position[rows] < counts["test"] + counts["val"], "val", "train"),
        )
    return pd.Series(split, index=frame["id"].to_numpy(), name="split").loc[list(ids)].reset_index(drop=True)
