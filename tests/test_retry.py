"""The shared HTTP retry policy: Retry-After parsing, the capped wait, and which failures are retried.

Both clients honouring Retry-After against a real server: tests/test_catalog_client.py and
tests/test_image_download.py; here, the image fetcher with an HTTP-date Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from tenacity import RetryCallState

from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.retry import RetryableError, http_retrying, parse_retry_after, retry_wait
from pseudolabel.testing.servers import Fault

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_delta_seconds():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("-5") == 0.0


@pytest.mark.parametrize(
    "http_date",
    [
        "Wed, 01 Jan 2025 12:00:07 GMT",
        "Wed, 01 Jan 2025 12:00:07 +0000",
        "Wed, 01 Jan 2025 12:00:07 -0000",  # naive from parsedate_to_datetime: once a TypeError
        "Wed, 01 Jan 2025 13:00:07 +0100",
    ],
)
def test_http_dates_in_any_utc_spelling(http_date):
    assert parse_retry_after(http_date, now=NOW.timestamp()) == 7.0


def test_a_past_date_means_now():
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(past, now=NOW.timestamp()) == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 -0000", now=NOW.timestamp()) == 0.0


@pytest.mark.parametrize(
    "garbage",
    [None, "", "   ", "soon", "nan", "inf", "Wed, 32 Jan 2025 12:00:07 GMT", "Wed, 01 Foo 2025 25:61:00 GMT"],
)
def test_garbage_is_none_never_an_error(garbage):
    assert parse_retry_after(garbage) is None


def failed_state(error: BaseException, attempt: int = 1) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_wait_is_the_servers_retry_after_capped():
    wait = retry_wait(backoff_initial_s=0.5, backoff_max_s=30.0, retry_after_max_s=120.0)
    assert wait(failed_state(RetryableError("503", retry_after_s=7.0))) == 7.0
    assert wait(failed_state(RetryableError("503", retry_after_s=0.0))) == 0.0
    assert wait(failed_state(RetryableError("503", retry_after_s=3600.0))) == 120.0


def test_without_retry_after_the_wait_is_jittered_exponential_backoff():
    wait = retry_wait(backoff_initial_s=0.5, backoff_max_s=3.0, retry_after_max_s=120.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        waits = [wait(failed_state(RetryableError("503"), attempt)) for _ in range(200)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered
    assert 0.0 <= wait(failed_state(ConnectionError("reset"))) <= 0.5


async def run_retrying(errors: list[BaseException], retry_on, attempts: int = 5) -> tuple[str, int]:
    calls = 0
    async for attempt in http_retrying(
        retry_on=retry_on, attempts=attempts, backoff_initial_s=0.0, backoff_max_s=0.0, retry_after_max_s=0.0
    ):
        with attempt:
            calls += 1
            if errors:
                raise errors.pop(0)
            return "ok", calls
    raise AssertionError("unreachable")


def test_retries_only_the_given_exception_types():
    assert asyncio.run(run_retrying([RetryableError("a"), RetryableError("b")], RetryableError)) == ("ok", 3)
    with pytest.raises(ValueError, match="permanent"):
        asyncio.run(run_retrying([ValueError("permanent")], RetryableError))


def test_gives_up_after_attempts_and_reraises_the_last_failure():
    errors: list[BaseException] = [RetryableError(f"try {i}") for i in range(5)]
    with pytest.raises(RetryableError, match="try 2"):
        asyncio.run(run_retrying(errors, RetryableError, attempts=3))
    assert len(errors) == 2


def test_image_fetcher_honours_an_http_date_retry_after(dev_server):
    server = dev_server(images={"a.jpg": b"body"})
    in_two_seconds = datetime.fromtimestamp(int(time.time()) + 2, UTC).replace(tzinfo=None)
    server.inject("/images/a.jpg", [Fault(status=503, retry_after=format_datetime(in_two_seconds))])

    async def fetch() -> bytes:
        async with ImageFetcher(DownloadPolicy(backoff_initial_s=0.01, backoff_max_s=0.05)) as fetcher:
            return await fetcher.fetch(server.image_url("a.jpg"))

    started = time.monotonic()
    assert asyncio.run(fetch()) == b"body"
    assert 0.9 <= time.monotonic() - started < 5  # 1-2 s: the date has whole seconds
    assert [r.status for r in server.requests] == [503, 200]
