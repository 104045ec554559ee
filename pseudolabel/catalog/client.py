"""Paging through the catalog REST API: ``GET <url>?offset=O&limit=N`` -> ``{"<items_key>": [...], "total": T}``.

Pages are fetched concurrently through a window of at most ``max_concurrency`` in-flight requests
but handed out strictly in offset order, so a run is deterministic whatever the network does. When
the API reports ``total`` the window stops there; otherwise it runs ahead speculatively and stops at
the first empty page (the few requests issued past the end are cancelled or ignored).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from pseudolabel.catalog.rows import CatalogBatch, ReasonTally, validated_batch
from pseudolabel.catalog.source import CatalogError, CatalogSource
from pseudolabel.retry import RetryableError, http_retrying, parse_retry_after

# httpcore runs `import sniffio` on every async request; when sniffio is not installed each attempt
# rescans sys.path (~0.5 ms, several per request: half the client's CPU). Recording the miss makes
# the import fail at once, exactly as it would anyway. (Installing sniffio removes the need.)
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is misconfigured; don't hang the run for hours


class RetryableStatus(RetryableError):
    """A 429 or 5xx answer: worth asking again."""

    def __init__(self, status: int, retry_after_s: float | None):
        super().__init__(f"HTTP {status}", retry_after_s)
        self.status = status


class MalformedPage(Exception):
    """A 2xx answer whose body is not a usable page (may be a cut-off body: worth asking again)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class _Page:
    offset: int
    items: list[Any] | None  # None when malformed after every retry
    total: int | None = None
    malformed_reason: str = ""
    malformed_detail: str = ""


async def aiter_http_batches(source: CatalogSource, start_offset: int = 0) -> AsyncIterator[CatalogBatch]:
    """One :class:`CatalogBatch` per non-empty page, in offset order, from ``start_offset``."""
    async with _http_client(source) as client:
        first = await _fetch_page(client, source, start_offset, source.page_size)
        if first.items is not None and not first.items:
            return
        total = first.total
        step = _page_step(source.page_size, first, start_offset)
        malformed_run = _MalformedRun(source.max_consecutive_malformed_pages)
        malformed_run.observe(first)
        yield _to_batch(first, source, step)

        next_offset = start_offset + step
        window: deque[asyncio.Task[_Page]] = deque()
        try:
            while True:
                while len(window) < source.max_concurrency and (total is None or next_offset < total):
                    window.append(asyncio.create_task(_fetch_page(client, source, next_offset, step)))
                    next_offset += step
                if not window:
                    return
                page = await window.popleft()
                if page.items is not None and not page.items:
                    return
                malformed_run.observe(page)
                yield _to_batch(page, source, step, total)
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)


def iter_http_batches(source: CatalogSource, start_offset: int = 0) -> Iterator[CatalogBatch]:
    """Synchronous view of :func:`aiter_http_batches` (drives a private event loop step by step)."""
    loop = asyncio.new_event_loop()
    batches = aiter_http_batches(source, start_offset)
    try:
        while True:
            try:
                batch = loop.run_until_complete(anext(batches))
            except StopAsyncIteration:
                return
            yield batch
    finally:
        loop.run_until_complete(batches.aclose())
        loop.close()


def fetch_reported_total(source: CatalogSource) -> int | None:
    """The catalog size the API reports (top-level ``total``), or None when it reports none."""

    async def first_page() -> _Page:
        async with _http_client(source) as client:
            return await _fetch_page(client, source, 0, 1)

    return asyncio.run(first_page()).total


def _http_client(source: CatalogSource) -> httpx.AsyncClient:
    headers = {"Accept": "application/json", "User-Agent": "pseudolabel-catalog/1"}
    if source.token:
        headers["Authorization"] = f"Bearer {source.token}"
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(source.timeout_s),
        limits=httpx.Limits(
            max_connections=source.max_concurrency, max_keepalive_connections=source.max_concurrency
        ),
        follow_redirects=True,  # httpx drops Authorization on cross-origin redirects
    )


async def _fetch_page(client: httpx.AsyncClient, source: CatalogSource, offset: int, limit: int) -> _Page:
    """One page, retried; malformed pages come back marked, any other lasting failure raises.

    Retried: transport errors (timeouts, refused/dropped connections), 429/5xx and malformed bodies.
    """
    retrying = http_retrying(
        retry_on=(httpx.TransportError, RetryableStatus, MalformedPage),
        attempts=source.max_retries + 1,
        backoff_initial_s=source.backoff_s,
        backoff_max_s=MAX_BACKOFF_S,
        retry_after_max_s=MAX_RETRY_AFTER_S,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await _get_page(client, source, offset, limit)
    except MalformedPage as exc:
        return _Page(offset, None, malformed_reason=exc.reason, malformed_detail=exc.detail)
    except RetryableStatus as exc:
        raise CatalogError(
            f"catalog {source.redacted} still answers HTTP {exc.status} for offset={offset} "
            f"after {source.max_retries + 1} attempts",
            retryable=True,
        ) from None
    except httpx.TransportError as exc:
        raise CatalogError(
            f"could not read catalog {source.redacted} at offset={offset} after "
            f"{source.max_retries + 1} attempts: {type(exc).__name__}: {exc}",
            retryable=True,
        ) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


async def _get_page(client: httpx.AsyncClient, source: CatalogSource, offset: int, limit: int) -> _Page:
    response = await client.get(source.location, params={"offset": offset, "limit": limit})
    status = response.status_code
    if status == 429 or status >= 500:
        raise RetryableStatus(status, parse_retry_after(response.headers.get("Retry-After")))
    if status in (401, 403):
        raise CatalogError(
            f"catalog {source.redacted} refused access (HTTP {status}): "
            "check PSEUDOLABEL_CATALOG_TOKEN (sent as a bearer token)"
        )
    if status >= 400:
        raise CatalogError(f"catalog {source.redacted} answered HTTP {status} for offset={offset}")
    return _parse_page(response.content, source.items_key, offset)


def _parse_page(body: bytes, items_key: str, offset: int) -> _Page:
    try:
        payload = json.loads(body)
    except ValueError:
        raise MalformedPage("invalid_json", body[:80].decode("utf-8", "replace")) from None
    if not isinstance(payload, dict):
        raise MalformedPage("page_not_an_object", type(payload).__name__)
    if items_key not in payload:
        raise MalformedPage("missing_items_key", f"keys: {sorted(payload)[:10]}")
    items = payload[items_key]
    if not isinstance(items, list):
        raise MalformedPage("items_not_a_list", type(items).__name__)
    total = payload.get("total")
    valid_total = isinstance(total, int) and not isinstance(total, bool) and total >= 0
    return _Page(offset, items, total=total if valid_total else None)


def _page_step(page_size: int, first: _Page, start_offset: int) -> int:
    """Offset step between pages: the page size, unless the API silently capped the first page.

    Stepping by the requested size over a capped API would skip items, so a first page shorter
    than requested (and not the last page) sets the step to what the API actually returns.
    """
    returned = len(first.items or ())
    more_expected = first.total is None or start_offset + returned < first.total
    return returned if 0 < returned < page_size and more_expected else page_size


def _to_batch(page: _Page, source: CatalogSource, step: int, total: int | None = None) -> CatalogBatch:
    total = page.total if page.total is not None else total
    if page.items is not None:
        end_offset = page.offset + len(page.items)
        return validated_batch(page.items, source.fields, page.offset, end_offset, total=total)
    malformed = ReasonTally()  # skipped: the next page starts a step further on
    malformed.add(page.malformed_reason, page.offset, page.malformed_detail)
    return validated_batch([], source.fields, page.offset, page.offset + step, malformed, total)


class _MalformedRun:
    """Fails fast when page after page is malformed: the URL or items_key is wrong, not one bad page."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def observe(self, page: _Page) -> None:
        if page.items is not None:
            self.count = 0
            return
        self.count += 1
        if self.count >= self.limit:
            raise CatalogError(
                f"{self.count} consecutive malformed catalog pages (last at offset={page.offset}: "
                f"{page.malformed_reason} {page.malformed_detail}); is the URL and items_key right?"
            )
