"""Retry policy for catalog page requests: exponential backoff, and a 429's Retry-After wins."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 600.0  # a server asking for longer is misconfigured; don't hang the run for hours


class RetryableStatus(Exception):
    """A 429 or 5xx answer: worth asking again."""

    def __init__(self, status: int, retry_after_s: float | None):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s


class MalformedPage(Exception):
    """A 2xx answer whose body is not a usable page (may be a cut-off body: worth asking again)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def retry_after_seconds(header: str | None, now: datetime | None = None) -> float | None:
    """Parse Retry-After: delta-seconds (what catalogs send) or an HTTP date."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def page_retrying(max_retries: int, backoff_s: float) -> AsyncRetrying:
    """Retry transport errors (timeouts, refused/dropped connections), 429/5xx and malformed bodies."""
    backoff = wait_exponential_jitter(initial=backoff_s, max=MAX_BACKOFF_S, jitter=backoff_s)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableStatus) and error.retry_after_s is not None:
            return min(error.retry_after_s, MAX_RETRY_AFTER_S)
        return backoff(state)

    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=wait,
        retry=retry_if_exception_type((httpx.TransportError, RetryableStatus, MalformedPage)),
        reraise=True,
    )
