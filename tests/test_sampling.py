"""Stratified sampling: allocation bounds, proportions, determinism, no duplicates."""

import numpy as np
import pandas as pd
import pytest

from pseudolabel.sampling import SamplingRules, allocate, assign_shards, stratified_sample

POPULATIONS = {"oak": 60_000, "pine": 30_000, "fern": 9_000, "moss": 950, "rare": 50}


def make_catalog(populations, seed=1):
    rows = [
        (f"https://img.example/{label}/{i}.jpg", label) for label, n in populations.items() for i in range(n)
    ]
    frame = pd.DataFrame(rows, columns=["url", "label"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def chunks_of(frame, size):
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


def test_allocation_is_proportional_and_sums_to_target():
    alloc = allocate(POPULATIONS, SamplingRules(sample_size=10_000, min_per_stratum=0))
    assert sum(alloc.values()) == 10_000
    total = sum(POPULATIONS.values())
    for label, n in POPULATIONS.items():
        assert alloc[label] == pytest.approx(10_000 * n / total, abs=1)


def test_allocation_honours_minimum_and_cap():
    alloc = allocate(POPULATIONS, SamplingRules(sample_size=1_000, min_per_stratum=40, max_per_stratum=400))
    assert sum(alloc.values()) == 1_000
    assert all(40 <= a <= 400 for a in alloc.values())
    assert alloc["oak"] == 400  # capped, surplus moved to the others
    assert alloc["rare"] == 40 and alloc["moss"] >= 40


def test_minimum_never_exceeds_population_and_minimums_win_when_budget_is_too_small():
    alloc = allocate({"a": 1_000, "b": 3}, SamplingRules(sample_size=10, min_per_stratum=8))
    assert alloc == {"a": 8, "b": 3}


def test_small_catalog_is_taken_whole():
    assert allocate({"a": 5, "b": 2}, SamplingRules(sample_size=100)) == {"a": 5, "b": 2}


def test_invalid_rules_are_rejected():
    with pytest.raises(ValueError, match="max_per_stratum"):
        SamplingRules(min_per_stratum=10, max_per_stratum=5)
    with pytest.raises(ValueError, match="sample_size"):
        SamplingRules(sample_size=-1)


def test_sample_proportions_minimums_and_uniqueness():
    catalog = make_catalog(POPULATIONS)
    rules = SamplingRules(sample_size=5_000, min_per_stratum=25, seed=7)
    sample = stratified_sample(chunks_of(catalog, 7_000), POPULATIONS, rules, shard_size=1_000)
    counts = sample["label"].value_counts()
    assert len(sample) == 5_000
    assert counts["rare"] == 25 and counts["moss"] >= 25
    total = sum(POPULATIONS.values())
    for label in ("oak", "pine", "fern"):
        assert counts[label] / 5_000 == pytest.approx(POPULATIONS[label] / total, rel=0.05)
    assert not sample["url"].duplicated().any()
    assert not sample["image_id"].duplicated().any()
    assert set(sample["shard"]) == {f"shard-{i:05d}" for i in range(5)}


def test_sample_is_deterministic_per_seed_and_independent_of_order_and_chunking():
    catalog = make_catalog(POPULATIONS)
    rules = SamplingRules(sample_size=2_000, seed=3)
    a = stratified_sample(chunks_of(catalog, 10_000), POPULATIONS, rules, shard_size=500)
    shuffled = catalog.sample(frac=1.0, random_state=99)
    b = stratified_sample(chunks_of(shuffled, 3_333), POPULATIONS, rules, shard_size=500)
    pd.testing.assert_frame_equal(a, b)
    other = stratified_sample(chunks_of(catalog, 10_000), POPULATIONS, SamplingRules(2_000, seed=4), 500)
    assert set(other["url"]) != set(a["url"])


def test_duplicate_urls_in_input_are_sampled_once():
    catalog = make_catalog({"a": 100})
    doubled = pd.concat([catalog, catalog])
    sample = stratified_sample(chunks_of(doubled, 64), {"a": 200}, SamplingRules(sample_size=150), 50)
    assert len(sample) == 100 and not sample["url"].duplicated().any()


def test_shards_mix_strata_and_ids_are_stable():
    catalog = make_catalog(POPULATIONS)
    sample = stratified_sample([catalog], POPULATIONS, SamplingRules(sample_size=3_000), shard_size=1_000)
    first = sample[sample["shard"] == "shard-00000"]["label"].value_counts(normalize=True)
    assert first["oak"] == pytest.approx(0.6, abs=0.08)  # shards are random mixtures, not label blocks
    again = assign_shards(sample[["url", "label", "source_id", "sample_key"]], 1_000)
    assert (again["image_id"] == sample["image_id"]).all()
    assert np.all(sample["sample_key"].to_numpy()[:-1] <= sample["sample_key"].to_numpy()[1:])
