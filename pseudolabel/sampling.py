"""Stratified sampling by label: proportional allocation with per-stratum floor and cap.

Selection is by a seeded 64-bit hash of the URL: within each stratum the rows with the smallest
keys win. That makes the sample deterministic for a seed, independent of catalog order and of
how the catalog was chunked, and lets it be computed in one streaming pass over the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pseudolabel.ids import image_id_for_url
from pseudolabel.layout import shard_name


@dataclass(frozen=True)
class SamplingRules:
    sample_size: int = 100_000
    min_per_stratum: int = 10
    max_per_stratum: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample_size < 0:
            raise ValueError(f"sample_size must be >= 0, got {self.sample_size}")
        if self.min_per_stratum < 0:
            raise ValueError(f"min_per_stratum must be >= 0, got {self.min_per_stratum}")
        if self.max_per_stratum is not None and self.max_per_stratum < self.min_per_stratum:
            raise ValueError(
                f"max_per_stratum ({self.max_per_stratum}) must be >= min_per_stratum ({self.min_per_stratum})"
            )


def allocate(populations: Mapping[str, int], rules: SamplingRules) -> dict[str, int]:
    """How many items to draw from each stratum.

    Proportional to population, then clipped to ``[min_per_stratum, max_per_stratum]`` and to the
    population itself, with the freed/extra budget redistributed proportionally (water-filling),
    so the total equals ``sample_size`` whenever the bounds allow it. When the minimums alone
    exceed ``sample_size`` the minimums win (the sample grows): a rare class is never dropped.
    """
    labels = sorted(label for label, n in populations.items() if n > 0)
    if not labels:
        return {}
    pop = np.array([populations[label] for label in labels], dtype=np.float64)
    cap = np.minimum(pop, rules.max_per_stratum if rules.max_per_stratum is not None else np.inf)
    floor = np.minimum(cap, rules.min_per_stratum)
    target = rules.sample_size

    if cap.sum() <= target:
        alloc = cap
    elif floor.sum() >= target:
        alloc = floor
    else:
        alloc = _water_fill(pop, floor, cap, target)
    return {label: int(count) for label, count in zip(labels, alloc, strict=True)}


def _water_fill(pop: np.ndarray, floor: np.ndarray, cap: np.ndarray, target: int) -> np.ndarray:
    """Integer allocation clip(scale * pop, floor, cap) summing exactly to ``target``."""

    def total(scale: float) -> float:
        return float(np.clip(scale * pop, floor, cap).sum())

    lo, hi = 0.0, float((cap / pop).max())
    for _ in range(200):  # bisection on the proportionality factor; converges far below 1 item
        mid = (lo + hi) / 2
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    exact = np.clip(hi * pop, floor, cap)
    alloc = np.floor(exact)
    # Largest remainders get the leftover units, never beyond a stratum's cap.
    shortfall = int(target - alloc.sum())
    order = np.argsort(-(exact - alloc), kind="stable")
    for i in order:
        if shortfall <= 0:
            break
        if alloc[i] + 1 <= cap[i]:
            alloc[i] += 1
            shortfall -= 1
    return alloc


def sample_keys(urls: pd.Series, seed: int) -> np.ndarray:
    """Seeded uint64 keys: the same URL and seed always give the same key."""
    hash_key = f"pseudolabel{seed:05d}"[-16:].rjust(16, "0")
    return pd.util.hash_pandas_object(urls.astype(str), index=False, hash_key=hash_key).to_numpy()


class StratifiedSelector:
    """Streams catalog chunks and keeps, per label, the ``quota`` rows with the smallest keys.

    Memory is bounded by the sample size, not the catalog size.
    """

    def __init__(self, quotas: Mapping[str, int], seed: int):
        self.quotas = dict(quotas)
        self.seed = seed
        self._kept = pd.DataFrame(
            {
                "url": pd.Series(dtype=str),
                "label": pd.Series(dtype=str),
                "source_id": pd.Series(dtype=str),
                "sample_key": pd.Series(dtype=np.uint64),
            }
        )

    def add(self, chunk: pd.DataFrame) -> None:
        chunk = chunk[chunk["label"].isin(self.quotas.keys())]
        if chunk.empty:
            return
        chunk = chunk.assign(sample_key=sample_keys(chunk["url"], self.seed))
        if "source_id" not in chunk:
            chunk = chunk.assign(source_id=None)
        merged = pd.concat([self._kept, chunk[list(self._kept.columns)]], ignore_index=True)
        # URL as tie-breaker makes the order total, so results never depend on chunking.
        merged = merged.sort_values(["label", "sample_key", "url"], kind="stable")
        merged = merged.drop_duplicates("url")
        rank = merged.groupby("label", sort=False).cumcount()
        limit = merged["label"].map(self.quotas)
        self._kept = merged[rank < limit].reset_index(drop=True)

    def result(self) -> pd.DataFrame:
        return self._kept.sort_values(["sample_key", "url"], kind="stable").reset_index(drop=True)


def assign_shards(selected: pd.DataFrame, shard_size: int, first_shard: int = 0) -> pd.DataFrame:
    """Give each row its stable ``image_id`` and a shard, in sample-key order.

    Because rows are in hash order, every shard is a random mixture of all strata.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    out = selected.reset_index(drop=True).copy()
    out["image_id"] = [image_id_for_url(url) for url in out["url"]]
    if out["image_id"].duplicated().any():
        raise ValueError("image_id collision in sample: two URLs hash to the same id")
    shard_numbers = first_shard + np.arange(len(out)) // shard_size
    out["shard"] = [shard_name(int(i)) for i in shard_numbers]
    return out[["image_id", "url", "label", "shard", "source_id", "sample_key"]]


def stratified_sample(
    chunks: Iterable[pd.DataFrame],
    populations: Mapping[str, int],
    rules: SamplingRules,
    shard_size: int,
    first_shard: int = 0,
) -> pd.DataFrame:
    """Allocate, select and shard in one streaming pass over ``chunks`` (url, label[, source_id])."""
    selector = StratifiedSelector(allocate(populations, rules), rules.seed)
    for chunk in chunks:
        selector.add(chunk)
    return assign_shards(selector.result(), shard_size, first_shard)


def stratum_report(populations: Mapping[str, int], sample: pd.DataFrame) -> pd.DataFrame:
    """Per-stratum population vs sample, for the UI."""
    sampled = sample["label"].value_counts()
    total_pop = sum(populations.values()) or 1
    total_sample = max(len(sample), 1)
    rows = [
        {
            "label": label,
            "population": int(n),
            "sampled": int(sampled.get(label, 0)),
            "population_share": n / total_pop,
            "sample_share": int(sampled.get(label, 0)) / total_sample,
        }
        for label, n in populations.items()
    ]
    return pd.DataFrame(rows).sort_values("population", ascending=False).reset_index(drop=True)


def incremental_quotas(
    new_populations: Mapping[str, int],
    already_sampled: Mapping[str, int],
    sampling_rate: float,
    rules: SamplingRules,
) -> dict[str, int]:
    """Quotas for catalog items that arrived after the sample was drawn, under the same rules.

    The new items are sampled at the original overall rate, proportionally by label; a label still
    short of ``min_per_stratum`` is topped up and ``max_per_stratum`` counts what is already sampled.
    """
    budget = round(sampling_rate * sum(new_populations.values()))
    proportional = SamplingRules(sample_size=budget, min_per_stratum=0, seed=rules.seed)
    quotas = allocate(new_populations, proportional)
    for label, available in new_populations.items():
        have = already_sampled.get(label, 0)
        quota = max(quotas.get(label, 0), min(available, max(0, rules.min_per_stratum - have)))
        if rules.max_per_stratum is not None:
            quota = min(quota, max(0, rules.max_per_stratum - have))
        quotas[label] = quota
    return {label: q for label, q in quotas.items() if q > 0}


def extend_sample(
    existing: pd.DataFrame,
    new_items: pd.DataFrame,
    sampling_rate: float,
    rules: SamplingRules,
    shard_size: int,
) -> pd.DataFrame:
    """Rows to append to ``existing``: new items (never ones already sampled) in new shards."""
    fresh = new_items[~new_items["url"].isin(existing["url"])].drop_duplicates("url")
    if fresh.empty:
        return assign_shards(fresh.assign(sample_key=np.array([], np.uint64)), shard_size)
    quotas = incremental_quotas(
        fresh["label"].value_counts().to_dict(),
        existing["label"].value_counts().to_dict(),
        sampling_rate,
        rules,
    )
    selector = StratifiedSelector(quotas, rules.seed)
    selector.add(fresh)
    first_shard = 1 + max((int(s.rsplit("-", 1)[1]) for s in existing["shard"]), default=-1)
    return assign_shards(selector.result(), shard_size, first_shard)
