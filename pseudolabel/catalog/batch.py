"""The unit every catalog reader yields: a table of valid rows plus what was rejected on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pseudolabel.catalog.tally import ReasonTally

# Columns of every catalog batch and snapshot part.
CATALOG_ROWS = pa.schema(
    [
        ("url", pa.string()),
        ("label", pa.string()),
        ("source_id", pa.string()),  # the catalog's own id when it has one, else null
    ]
)


@dataclass
class CatalogBatch:
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
