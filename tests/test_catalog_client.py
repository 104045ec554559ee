"""The catalog API client against a real HTTP server (DevServer on 127.0.0.1)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pytest

from pseudolabel.catalog import CatalogError, CatalogSource, ItemFields, fetch_total, iter_catalog_batches
from pseudolabel.retry import parse_retry_after
from pseudolabel.testing.servers import Fault


def items(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": i, "image_url": f"https://img.example/{i}.jpg", "label": f"l{i % 3}"}
        for i in range(start, start + n)
    ]


def source(server, **options) -> CatalogSource:
    defaults = {"page_size": 10, "max_concurrency": 4, "timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01}
    return CatalogSource(server.catalog_url, **(defaults | options))


def read_all(src: CatalogSource, start_offset: int = 0):
    batches = list(iter_catalog_batches(src, start_offset))
    table = pa.concat_tables([b.table for b in batches]) if batches else None
    return batches, table


def offsets(server) -> list[int]:
    return [int(parse_qs(urlsplit(path).query)["offset"][0]) for path in server.paths("/api/trees")]


def test_pages_until_reported_total_in_offset_order(dev_server):
    server = dev_server(items(95))
    batches, table = read_all(source(server))
    assert table.column("url").to_pylist() == [f"https://img.example/{i}.jpg" for i in range(95)]
    assert table.column("source_id").to_pylist() == [str(i) for i in range(95)]
    assert [b.start_offset for b in batches] == list(range(0, 95, 10))
    assert batches[-1].end_offset == 95 and batches[-1].total == 95
    # The reported total is trusted: no request past it.
    assert sorted(offsets(server)) == list(range(0, 95, 10))


def test_without_total_stops_at_first_empty_page(dev_server):
    server = dev_server(items(95), report_total=False)
    batches, table = read_all(source(server, max_concurrency=4))
    assert table.num_rows == 95
    assert batches[-1].total is None and batches[-1].end_offset == 95
    requested = offsets(server)
    assert 100 in requested  # the empty page that ended it
    assert max(requested) <= 100 + 4 * 10  # speculation is bounded by the window


def test_output_order_does_not_depend_on_completion_order(dev_server):
    server = dev_server(items(60))
    server.inject("/api/trees?offset=10&", [Fault(delay_s=0.4)])  # page 1 finishes after pages 2-5
    _, table = read_all(source(server, max_concurrency=5))
    assert table.column("url").to_pylist() == [f"https://img.example/{i}.jpg" for i in range(60)]


def test_start_offset_resumes_mid_catalog(dev_server):
    server = dev_server(items(50))
    batches, table = read_all(source(server), start_offset=25)
    assert table.column("source_id").to_pylist() == [str(i) for i in range(25, 50)]
    assert batches[0].start_offset == 25


def test_server_errors_are_retried(dev_server):
    server = dev_server(items(30))
    server.inject("/api/trees?offset=10&", [Fault(status=500), Fault(status=503)])
    _, table = read_all(source(server))
    assert table.num_rows == 30
    page_1 = [status for path, status in server.requests if path.startswith("/api/trees?offset=10&")]
    assert page_1 == [500, 503, 200]


def test_lasting_server_error_fails_after_max_retries(dev_server):
    server = dev_server(items(30))
    server.inject("/api/trees?offset=0&", [Fault(status=500)] * 10)
    with pytest.raises(CatalogError, match="HTTP 500 for offset=0 after 3 attempts"):
        read_all(source(server, max_retries=2))
    assert len(server.paths("/api/trees?offset=0&")) == 3


def test_429_retry_after_is_honoured(dev_server):
    server = dev_server(items(10))
    server.inject("/api/trees", [Fault(status=429, retry_after=1)])
    started = time.monotonic()
    _, table = read_all(source(server, backoff_s=0.01))
    assert time.monotonic() - started >= 0.95  # the backoff alone would be ~0.02 s
    assert table.num_rows == 10
    assert [status for _, status in server.requests] == [429, 200]


def test_retry_after_accepts_seconds_and_http_dates():
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_retry_after_http_date_without_zone_is_honoured(dev_server):
    # "-0000" (UTC, sender's zone unknown) once raised TypeError here instead of waiting.
    server = dev_server(items(10))
    in_two_seconds = datetime.fromtimestamp(int(time.time()) + 2, UTC).replace(tzinfo=None)
    server.inject("/api/trees", [Fault(status=503, retry_after=format_datetime(in_two_seconds))])
    started = time.monotonic()
    _, table = read_all(source(server, backoff_s=0.01))
    assert 0.9 <= time.monotonic() - started < 5  # 1-2 s: the date has whole seconds
    assert table.num_rows == 10
    assert [status for _, status in server.requests] == [503, 200]


def test_timeouts_are_retried(dev_server):
    server = dev_server(items(20))
    server.inject("/api/trees?offset=10&", [Fault(delay_s=3)])
    started = time.monotonic()
    _, table = read_all(source(server, timeout_s=0.3))
    assert table.num_rows == 20
    assert time.monotonic() - started < 2.5  # did not wait for the slow answer


def test_dropped_connections_are_retried(dev_server):
    server = dev_server(items(20))
    server.inject("/api/trees?offset=0&", [Fault(truncate_to=15)])
    _, table = read_all(source(server))
    assert table.num_rows == 20
    assert len(server.paths("/api/trees?offset=0&")) == 2


def test_unreachable_catalog_is_a_clear_error():
    src = CatalogSource("http://127.0.0.1:9/api/trees", max_retries=1, backoff_s=0.01)
    with pytest.raises(CatalogError, match="could not read catalog http://127.0.0.1:9/api/trees"):
        read_all(src)


def test_bad_json_once_is_retried_not_counted(dev_server):
    server = dev_server(items(20))
    server.inject("/api/trees?offset=10&", [Fault(body=b"<html>oops")])
    batches, table = read_all(source(server))
    assert table.num_rows == 20
    assert sum(b.malformed_pages.total for b in batches) == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "page_not_an_object"),
        (b'{"items": []}', "missing_items_key"),
        (b'{"trees": {"a": 1}}', "items_not_a_list"),
    ],
)
def test_malformed_page_is_counted_and_skipped(dev_server, body, reason):
    server = dev_server(items(30))
    server.inject("/api/trees?offset=10&", [Fault(body=body)] * 4)  # every attempt (max_retries=3)
    batches, table = read_all(source(server))
    assert table.column("source_id").to_pylist() == [str(i) for i in (*range(10), *range(20, 30))]
    malformed = [b for b in batches if b.malformed_pages.total]
    assert len(malformed) == 1
    assert dict(malformed[0].malformed_pages.counts) == {reason: 1}
    assert malformed[0].malformed_pages.examples[reason][0]["offset"] == 10
    assert malformed[0].end_offset == 20  # a resumable cursor skips past it


def test_page_after_page_malformed_means_misconfigured(dev_server):
    server = dev_server(items(100), items_key="items")  # the client still expects "trees"
    with pytest.raises(CatalogError, match="consecutive malformed.*items_key"):
        read_all(source(server, max_retries=0, max_consecutive_malformed_pages=3))


def test_malformed_items_are_counted_with_reasons(dev_server):
    catalog = [
        {"image_url": "https://img.example/ok.jpg", "label": "oak", "id": "a"},
        "just a string",
        {"label": "oak"},
        {"image_url": "", "label": "oak"},
        {"image_url": 42, "label": "oak"},
        {"image_url": "ftp://img.example/x.jpg", "label": "oak"},
        {"image_url": "https://img.example/nolabel.jpg"},
        {"image_url": "https://img.example/blank.jpg", "label": "  "},
        {"image_url": " HTTPS://img.example/ok2.jpg ", "label": "pine", "id": 7},
    ]
    server = dev_server(catalog)
    batches, table = read_all(source(server))
    assert table.to_pylist() == [
        {"url": "https://img.example/ok.jpg", "label": "oak", "source_id": "a"},
        {"url": "HTTPS://img.example/ok2.jpg", "label": "pine", "source_id": "7"},
    ]
    invalid = batches[0].invalid_rows
    assert dict(invalid.counts) == {
        "not_an_object": 1,
        "missing_url": 1,
        "empty_url": 1,
        "url_not_string": 1,
        "url_not_http": 1,
        "missing_label": 1,
        "empty_label": 1,
    }
    assert invalid.examples["url_not_http"][0]["offset"] == 5


def test_empty_catalog_yields_nothing(dev_server):
    for report_total in (True, False):
        server = dev_server([], report_total=report_total)
        batches, _ = read_all(source(server))
        assert batches == []
        assert offsets(server) == [0]


def test_capped_page_size_does_not_skip_items(dev_server):
    server = dev_server(items(250), max_limit=30)  # asks for 100, gets 30
    _, table = read_all(source(server, page_size=100))
    assert table.column("source_id").to_pylist() == [str(i) for i in range(250)]


def test_token_is_sent_as_bearer_header(dev_server):
    server = dev_server(items(15), required_token="s3cret-token")
    _, table = read_all(source(server, token="s3cret-token"))
    assert table.num_rows == 15
    assert {status for _, status in server.requests} == {200}


def test_missing_token_is_a_clear_error_that_never_shows_the_token(dev_server):
    server = dev_server(items(15), required_token="s3cret-token")
    with pytest.raises(CatalogError, match="PSEUDOLABEL_CATALOG_TOKEN") as failure:
        read_all(source(server, token="wrong-token"))
    assert "wrong-token" not in str(failure.value)
    assert "wrong-token" not in repr(source(server, token="wrong-token"))


def test_custom_items_key_and_field_names(dev_server):
    catalog = [{"src": f"https://img.example/{i}.jpg", "species": "oak", "uid": f"u{i}"} for i in range(5)]
    server = dev_server(catalog, items_key="results")
    fields = ItemFields(url="src", label="species", id="uid")
    _, table = read_all(source(server, items_key="results", fields=fields))
    assert table.column("source_id").to_pylist() == [f"u{i}" for i in range(5)]


def test_fetch_total(dev_server):
    assert fetch_total(source(dev_server(items(42)))) == 42
    assert fetch_total(source(dev_server(items(42), report_total=False))) is None


def test_source_is_redacted_for_logs():
    src = CatalogSource("https://user:pw@api.example.com:8443/v1/trees?api_key=abc#x")
    assert src.redacted == "https://api.example.com:8443/v1/trees"


def test_missing_source_says_how_to_set_it():
    with pytest.raises(CatalogError, match="export PSEUDOLABEL_CATALOG="):
        CatalogSource("")
