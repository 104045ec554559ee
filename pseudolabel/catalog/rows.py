"""Catalog rows: validating raw items into (url, label, source_id), batches of them, and the tally of
what was rejected, by reason with a few examples each, so nothing is dropped silently.

Most pages are entirely valid, so a page is first checked column-wise with Arrow kernels (fast);
only a page that fails that check is walked item by item to name each rejected item's reason.
Both paths produce the same rows: stripped url and label, id as a string (or null).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pseudolabel.catalog.source import ItemFields
from pseudolabel.schemas import CATALOG_ROWS

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 200  # an example is a repr, cut short: items can be arbitrarily large
_HTTP_PREFIXES = ("http://", "https://")


@dataclass
class ReasonTally:
    """Rejected rows (or pages) counted by reason, with the first few examples of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, reason: str, offset: int, value: object = None) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append({"offset": offset, "value": _short_repr(value)})

    def merge(self, other: ReasonTally) -> None:
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: EXAMPLES_PER_REASON - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: counts by reason (most frequent first) and their examples."""
        return {
            "total": self.total,
            "counts": dict(self.counts.most_common()),
            "examples": {reason: self.examples[reason] for reason, _ in self.counts.most_common()},
        }


@dataclass
class CatalogBatch:
    """The unit every catalog reader yields: a table of valid rows plus what was rejected on the way."""

    table: pa.Table  # CATALOG_ROWS, in catalog order
    start_offset: int  # catalog offset of the first item this batch covers
    end_offset: int  # offset to resume from after this batch (an incremental cursor)
    pages: int = 1  # API pages (or file batches) read for this batch
    invalid_rows: ReasonTally = field(default_factory=ReasonTally)
    malformed_pages: ReasonTally = field(default_factory=ReasonTally)
    total: int | None = None  # the catalog size the API reported, if any

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


class UnparsedItem(str):
    """The raw text of an item that did not even parse (e.g. a bad JSONL line): reported as invalid_json."""


def validate_items(
    items: Sequence[object], fields: ItemFields, first_offset: int, invalid: ReasonTally
) -> pa.Table:
    """Valid items as a CATALOG_ROWS table (order kept); each invalid one is counted in ``invalid``.

    ``first_offset`` is the catalog offset of ``items[0]``, so examples point back at the source.
    """
    table = _all_valid_fast(items, fields)
    return table if table is not None else _validate_each(items, fields, first_offset, invalid)


def validated_batch(
    items: Sequence[object],
    fields: ItemFields,
    start_offset: int,
    end_offset: int,
    malformed_pages: ReasonTally | None = None,
    total: int | None = None,
) -> CatalogBatch:
    """The batch of ``items`` (read from ``start_offset`` on), with its invalid items tallied."""
    invalid = ReasonTally()
    return CatalogBatch(
        table=validate_items(items, fields, start_offset, invalid),
        start_offset=start_offset,
        end_offset=end_offset,
        invalid_rows=invalid,
        malformed_pages=malformed_pages or ReasonTally(),
        total=total,
    )


def _all_valid_fast(items: Sequence[object], fields: ItemFields) -> pa.Table | None:
    """The page as a table if every item is valid, else None (then the slow path names the reasons)."""
    if not items:
        return None
    try:
        urls = pa.array([item[fields.url] for item in items], pa.string())  # type: ignore[index]
        labels = pa.array([item[fields.label] for item in items], pa.string())  # type: ignore[index]
    except (TypeError, KeyError, pa.ArrowException):  # a non-object item, a missing or non-string field
        return None
    if urls.null_count or labels.null_count:
        return None
    urls = pc.utf8_trim_whitespace(urls)
    labels = pc.utf8_trim_whitespace(labels)
    scheme = pc.utf8_lower(pc.utf8_slice_codeunits(urls, 0, 8))
    is_http = pc.or_(pc.starts_with(scheme, _HTTP_PREFIXES[0]), pc.starts_with(scheme, _HTTP_PREFIXES[1]))
    if not pc.all(pc.and_(is_http, pc.greater(pc.utf8_length(labels), 0))).as_py():
        return None
    ids = [item.get(fields.id) for item in items] if fields.id else [None] * len(items)  # type: ignore[union-attr]
    return pa.Table.from_arrays([urls, labels, _id_array(ids)], schema=CATALOG_ROWS)


def _id_array(ids: list[object]) -> pa.Array:
    try:
        inferred = pa.array(ids)
    except pa.ArrowException:  # mixed types: decide per value
        inferred = None
    if inferred is not None and (
        pa.types.is_string(inferred.type)
        or pa.types.is_integer(inferred.type)
        or pa.types.is_null(inferred.type)
    ):
        return inferred.cast(pa.string())
    return pa.array([_source_id(value) for value in ids], pa.string())


def _validate_each(
    items: Sequence[object], fields: ItemFields, first_offset: int, invalid: ReasonTally
) -> pa.Table:
    urls: list[str] = []
    labels: list[str] = []
    source_ids: list[str | None] = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            reason = "invalid_json" if isinstance(item, UnparsedItem) else "not_an_object"
            invalid.add(reason, first_offset + position, item)
            continue
        url = item.get(fields.url)
        label = item.get(fields.label)
        reason = _field_problem("url", url) or _url_scheme_problem(url) or _field_problem("label", label)
        if reason:
            invalid.add(reason, first_offset + position, item)
            continue
        urls.append(url.strip())
        labels.append(label.strip())
        source_ids.append(_source_id(item.get(fields.id)) if fields.id else None)
    return pa.Table.from_arrays(
        [pa.array(urls, pa.string()), pa.array(labels, pa.string()), pa.array(source_ids, pa.string())],
        schema=CATALOG_ROWS,
    )


def _field_problem(name: str, value: object) -> str | None:
    if value is None:
        return f"missing_{name}"
    if not isinstance(value, str):
        return f"{name}_not_string"
    if not value.strip():
        return f"empty_{name}"
    return None


def _url_scheme_problem(url: str) -> str | None:
    # Only reached with a non-empty string; the scheme is case-insensitive (HTTPS://... is fine).
    return None if url.strip()[:8].lower().startswith(_HTTP_PREFIXES) else "url_not_http"


def _source_id(value: object) -> str | None:
    # Catalogs use string or integer ids; anything else is not a usable id (bool is an int subclass).
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _short_repr(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."
