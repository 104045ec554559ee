"""Where the catalog comes from and how to read it: an http(s) API or a local CSV/JSONL/Parquet file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

CATALOG_ENV = "PSEUDOLABEL_CATALOG"
CATALOG_TOKEN_ENV = "PSEUDOLABEL_CATALOG_TOKEN"


class CatalogError(RuntimeError):
    """The catalog cannot be read (the message says what to change). ``retryable`` when a later try may
    succeed (the server kept failing with 5xx/429 or dropped connections through every attempt);
    otherwise it is the configuration or the catalog itself, and retrying will not help."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ItemFields:
    """Names of the item fields (API JSON keys or file columns)."""

    url: str = "image_url"
    label: str = "label"
    id: str | None = "id"  # optional: the catalog's own id, kept as ``source_id``


@dataclass(frozen=True)
class CatalogSource:
    location: str  # http(s) URL of the list endpoint, or a local file path
    token: str | None = field(default=None, repr=False)  # bearer token: never repr'd, logged or stored
    items_key: str = "trees"
    fields: ItemFields = ItemFields()
    page_size: int = 1000
    max_concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_s: float = 0.5
    max_consecutive_malformed_pages: int = 10  # then the API (or items_key) is wrong: stop, don't spin
    file_batch_rows: int = 65_536

    def __post_init__(self) -> None:
        if not self.location.strip():
            raise CatalogError(
                f"no catalog configured: set {CATALOG_ENV} to the catalog API URL "
                f"(e.g. export {CATALOG_ENV}=https://catalog.example.com/api/trees) "
                "or to a local .csv/.jsonl/.parquet file with image_url,label[,id] columns"
            )
        for name in ("page_size", "max_concurrency", "max_consecutive_malformed_pages", "file_batch_rows"):
            if getattr(self, name) < 1:
                raise CatalogError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise CatalogError("max_retries and backoff_s must be >= 0 and timeout_s > 0")

    @property
    def is_http(self) -> bool:
        return is_http_url(self.location)

    @property
    def redacted(self) -> str:
        return redact_location(self.location)


def is_http_url(location: str) -> bool:
    return urlsplit(location.strip()).scheme.lower() in ("http", "https")


def redact_location(location: str) -> str:
    """The location safe to log and store: URLs lose user:password, query and fragment (may hold keys)."""
    if not is_http_url(location):
        return str(Path(location).expanduser().resolve())
    parts = urlsplit(location.strip())
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
