"""One retry policy for every HTTP client: the server's ``Retry-After`` wins (capped), else backoff.

A client raises a :class:`RetryableError` subclass for an answer worth asking again, carrying the
server's parsed ``Retry-After``; which exceptions are retried at all is the client's choice
(``retry_on``), so each keeps retrying only what can succeed on retry. Without a ``Retry-After``
the wait is exponential backoff with full jitter, so many clients failing together spread out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


class RetryableError(Exception):
    """An attempt that may succeed if repeated; ``retry_after_s`` is what the server asked, if anything."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (``GMT``, ``+0000``,
    ``-0000``; one in the past gives 0). None when absent or unparsable; never raises.

    ``now`` is a Unix timestamp (default: the current time).
    """
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value, time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
        if when.tzinfo is None:  # "-0000": UTC, the sender just does not say where it is
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_wait(
    *, backoff_initial_s: float, backoff_max_s: float, retry_after_max_s: float
) -> Callable[[RetryCallState], float]:
    """Tenacity wait: the failed attempt's ``retry_after_s`` (at most ``retry_after_max_s``), else a
    random wait up to ``backoff_initial_s * 2**(attempt - 1)``, at most ``backoff_max_s``."""
    backoff = wait_random_exponential(multiplier=backoff_initial_s, max=backoff_max_s)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableError) and error.retry_after_s is not None:
            return min(error.retry_after_s, retry_after_max_s)
        return backoff(state)

    return wait


def http_retrying(
    *,
    retry_on: ExceptionTypes,
    attempts: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    retry_after_max_s: float,
) -> AsyncRetrying:
    """Up to ``attempts`` tries while the failure is one of ``retry_on``; the last failure is re-raised.

    Build one per request: a tenacity controller keeps the state of the attempts it drives.
    """
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=retry_wait(
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            retry_after_max_s=retry_after_max_s,
        ),
        retry=retry_if_exception_type(retry_on),
        reraise=True,
    )
