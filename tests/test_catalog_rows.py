"""Item validation (fast column path == item-by-item path), synthetic catalogs and UI summaries."""

from __future__ import annotations

from collections import Counter

import pytest

from pseudolabel.catalog import (
    ItemFields,
    ReasonTally,
    label_histogram_markdown,
    reasons_markdown,
    redact_location,
)
from pseudolabel.catalog.rows import _all_valid_fast, _validate_each, validate_items
from pseudolabel.testing.catalogs import SyntheticCatalog

FIELDS = ItemFields()


@pytest.mark.parametrize(
    "ids",
    [["a", "b", "c"], [1, 2, 3], ["a", 2, None], [True, 1.5, {"x": 1}], [None, None, None]],
)
def test_fast_path_and_item_path_agree_on_valid_pages(ids):
    items = [
        {"image_url": " https://x/0.jpg ", "label": " oak\t", "id": ids[0]},
        {"image_url": "HTTP://x/1.jpg", "label": "pine", "id": ids[1]},
        {"image_url": "https://x/2.jpg", "label": "élm", "id": ids[2], "extra": [1]},
    ]
    invalid = ReasonTally()
    fast = validate_items(items, FIELDS, 0, invalid)
    assert _all_valid_fast(items, FIELDS) is not None  # the column path handled it
    assert fast.equals(_validate_each(items, FIELDS, 0, ReasonTally()))
    assert invalid.total == 0
    assert fast.column("url").to_pylist() == ["https://x/0.jpg", "HTTP://x/1.jpg", "https://x/2.jpg"]
    assert fast.column("label").to_pylist() == ["oak", "pine", "élm"]
    expected_ids = [str(i) if isinstance(i, str | int) and not isinstance(i, bool) else None for i in ids]
    assert fast.column("source_id").to_pylist() == expected_ids


def test_one_invalid_item_keeps_the_valid_rows_identical():
    valid = [{"image_url": f"https://x/{i}.jpg", "label": "oak", "id": i} for i in range(3)]
    invalid = ReasonTally()
    table = validate_items(
        [*valid[:2], {"image_url": "https://x/9.jpg", "label": 5}, valid[2]], FIELDS, 10, invalid
    )
    assert table.equals(validate_items(valid, FIELDS, 0, ReasonTally()))
    assert dict(invalid.counts) == {"label_not_string": 1}
    assert invalid.examples["label_not_string"][0]["offset"] == 12


def test_without_an_id_field_source_ids_are_null():
    items = [{"image_url": "https://x/0.jpg", "label": "oak", "id": "a"}]
    table = validate_items(items, ItemFields(id=None), 0, ReasonTally())
    assert table.column("source_id").to_pylist() == [None]


def test_tally_keeps_a_few_short_examples_and_merges():
    tally = ReasonTally()
    for offset in range(5):
        tally.add("empty_url", offset, {"image_url": "", "blob": "x" * 1000})
    other = ReasonTally()
    other.add("empty_url", 99)
    other.add("missing_label", 7, "y")
    tally.merge(other)
    assert dict(tally.counts) == {"empty_url": 6, "missing_label": 1}
    assert [example["offset"] for example in tally.examples["empty_url"]] == [0, 1, 2]
    assert all(len(example["value"]) <= 200 for example in tally.examples["empty_url"])
    assert tally.as_dict()["counts"] == {"empty_url": 6, "missing_label": 1}


def test_synthetic_catalog_is_deterministic_skewed_and_counts_its_duplicates():
    catalog = SyntheticCatalog(total=20_000, num_labels=50, duplicate_every=50)
    items = catalog(0, catalog.total)
    assert items == catalog(0, catalog.total)
    assert catalog(19_990, 100) == items[19_990:]
    urls = [item["image_url"] for item in items]
    assert len(set(urls)) == catalog.unique_urls() == 20_000 - 399
    labels = Counter(item["label"] for item in items)
    assert len(labels) == 50
    assert labels.most_common(1)[0][1] > 10 * min(labels.values())
    label_of = {}
    for item in items:  # a repeated URL always carries the same label
        assert label_of.setdefault(item["image_url"], item["label"]) == item["label"]


def test_label_histogram_markdown_shows_top_labels_and_the_rest():
    markdown = label_histogram_markdown({"oak": 50, "pine": 30, "a|b": 15, "elm": 5}, top=2)
    lines = markdown.splitlines()
    assert lines[2] == "| oak | 50 | 50.0% |"
    assert lines[3] == "| pine | 30 | 30.0% |"
    assert lines[4] == "| *2 other labels* | 20 | 20.0% |"


def test_reasons_markdown_escapes_table_breakers():
    tally = ReasonTally()
    tally.add("url_not_http", 4, "ftp://a|b`c")
    markdown = reasons_markdown(tally)
    assert "| url_not_http | 1 | @4: `ftp://a\\|b'c` |" in markdown
    assert reasons_markdown(ReasonTally(), "pages") == "No invalid pages."


def test_redact_location():
    assert redact_location("http://[::1]:8080/api?k=v") == "http://[::1]:8080/api"
    assert redact_location("https://tok@api.example/x") == "https://api.example/x"
