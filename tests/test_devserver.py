"""The local dev/test server itself: catalog pages, images, faults, token check, request log."""

from __future__ import annotations

import time

import httpx
import pytest

from pseudolabel.testing.servers import DevServer, Fault


def test_list_catalog_pages_with_and_without_total(dev_server):
    catalog = [{"image_url": f"https://x/{i}.jpg", "label": "oak"} for i in range(5)]
    server = dev_server(catalog)
    page = httpx.get(server.catalog_url, params={"offset": 3, "limit": 10}).json()
    assert page == {"trees": catalog[3:], "total": 5}
    bare = dev_server(catalog, items_key="items", report_total=False)
    assert httpx.get(bare.catalog_url, params={"offset": 0, "limit": 2}).json() == {"items": catalog[:2]}
    assert httpx.get(server.catalog_url, params={"offset": "x"}).status_code == 400


def test_callable_catalog_is_generated_per_page(dev_server):
    calls = []

    def page(offset, limit):
        calls.append((offset, limit))
        return [{"n": i} for i in range(offset, offset + limit)]

    server = dev_server(page, total=15_000_000, max_limit=3)
    body = httpx.get(server.catalog_url, params={"offset": 14_999_999, "limit": 100}).json()
    assert body == {"trees": [{"n": 14_999_999}], "total": 15_000_000}
    assert httpx.get(server.catalog_url, params={"offset": 0, "limit": 100}).json()["trees"] == [
        {"n": 0},
        {"n": 1},
        {"n": 2},
    ]
    assert calls == [(14_999_999, 1), (0, 3)]
    with pytest.raises(ValueError, match="total"):
        DevServer(page)


def test_images_are_served_with_a_content_type(dev_server):
    server = dev_server(images={"a.jpg": b"\xff\xd8jpeg", "b.png": b"\x89PNG"})
    jpeg = httpx.get(server.image_url("a.jpg"))
    assert (jpeg.status_code, jpeg.content, jpeg.headers["content-type"]) == (
        200,
        b"\xff\xd8jpeg",
        "image/jpeg",
    )
    assert httpx.get(server.image_url("b.png")).headers["content-type"] == "image/png"
    head = httpx.head(server.image_url("a.jpg"))
    assert head.headers["content-length"] == "6" and head.content == b""
    assert httpx.get(server.image_url("missing.jpg")).status_code == 404


def test_faults_are_consumed_in_order_per_matching_request(dev_server):
    server = dev_server(images={"a.jpg": b"A" * 100})
    server.inject("/images/a", [Fault(status=429, retry_after=2), Fault(body=b"garbage"), Fault(status=500)])
    url = server.image_url("a.jpg")
    first = httpx.get(url)
    assert (first.status_code, first.headers["retry-after"]) == (429, "2")
    assert httpx.get(server.catalog_url).status_code == 200  # another prefix: no fault consumed
    assert httpx.get(url).content == b"garbage"
    assert httpx.get(url).status_code == 500
    assert httpx.get(url).content == b"A" * 100
    assert server.requests == [
        ("/images/a.jpg", 429),
        ("/api/trees", 200),
        ("/images/a.jpg", 200),
        ("/images/a.jpg", 500),
        ("/images/a.jpg", 200),
    ]


def test_truncated_body_breaks_the_response(dev_server):
    server = dev_server(images={"a.jpg": b"A" * 1000})
    server.inject("/images/", [Fault(truncate_to=10)])
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(server.image_url("a.jpg"))
    assert httpx.get(server.image_url("a.jpg")).content == b"A" * 1000


def test_delay_and_latency(dev_server):
    server = dev_server(images={"a.jpg": b"A"}, latency_s=0.0, image_latency_s=0.2)
    started = time.monotonic()
    httpx.get(server.catalog_url)
    assert time.monotonic() - started < 0.15
    httpx.get(server.image_url("a.jpg"))
    assert time.monotonic() - started >= 0.2
    server.inject("/api/", [Fault(delay_s=2)])
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.catalog_url, timeout=0.2)


def test_required_token(dev_server):
    server = dev_server(images={"a.jpg": b"A"}, required_token="t0k")
    assert httpx.get(server.image_url("a.jpg")).status_code == 401
    assert httpx.get(server.image_url("a.jpg"), headers={"Authorization": "Bearer t0k"}).status_code == 200


def test_context_manager_and_url_before_start():
    server = DevServer([])
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.catalog_url == server.url + "/api/trees"
        assert server.image_url("x.jpg") == server.url + "/images/x.jpg"
        url = server.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=1)
