"""Where the image catalog comes from: ``PSEUDOLABEL_CATALOG`` (API URL or local file) and its token.

The token is read through ``EnvVar`` so the Dagster UI shows the variable's name, never its value.
"""

# No ``from __future__ import annotations``: Dagster reads resource field annotations at runtime.
import os
from collections.abc import Iterator

from dagster import ConfigurableResource, EnvVar

from pseudolabel.catalog import (
    CATALOG_ENV,
    CATALOG_TOKEN_ENV,
    CatalogBatch,
    CatalogSource,
    ItemFields,
    fetch_total,
    iter_catalog_batches,
)


class CatalogResource(ConfigurableResource):
    """The catalog to snapshot, and how to page through it."""

    source: str = ""  # http(s) URL of the list endpoint, or a .csv/.jsonl/.parquet path
    token: str | None = None  # bearer token; pass EnvVar(...) so it never shows up in the UI
    items_key: str = "trees"
    url_field: str = "image_url"
    label_field: str = "label"
    id_field: str | None = "id"
    page_size: int = 1000
    max_concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_s: float = 0.5

    def catalog_source(self) -> CatalogSource:
        """The Dagster-free description the domain code reads (raises a how-to-fix error if unset)."""
        return CatalogSource(
            location=self.source,
            token=self.token or None,
            items_key=self.items_key,
            fields=ItemFields(url=self.url_field, label=self.label_field, id=self.id_field or None),
            page_size=self.page_size,
            max_concurrency=self.max_concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
        )

    def iter_batches(self, start_offset: int = 0) -> Iterator[CatalogBatch]:
        return iter_catalog_batches(self.catalog_source(), start_offset)

    def fetch_total(self) -> int | None:
        return fetch_total(self.catalog_source())


def catalog_from_env() -> CatalogResource:
    """The resource ``PSEUDOLABEL_CATALOG`` / ``PSEUDOLABEL_CATALOG_TOKEN`` describe.

    An unset catalog still loads (other assets keep working); materializing ``catalog_snapshot``
    then fails with a message saying how to set it.
    """
    # EnvVar values are resolved by Dagster from os.environ when the resource is used.
    has_source = bool(os.environ.get(CATALOG_ENV, "").strip())
    has_token = bool(os.environ.get(CATALOG_TOKEN_ENV, "").strip())
    return CatalogResource(
        source=EnvVar(CATALOG_ENV) if has_source else "",
        token=EnvVar(CATALOG_TOKEN_ENV) if has_token else None,
    )
