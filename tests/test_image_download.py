"""ImageFetcher against a real local HTTP server (pseudolabel.testing.servers) and, for what a
Content-Length-sending server cannot show, an in-process httpx transport."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.images.errors import ImageRejected, RejectReason
from pseudolabel.retry import parse_retry_after
from pseudolabel.testing.servers import DevServer, Fault

BODY = bytes(range(256)) * 8  # 2 KiB; the fetcher does not care whether it is an image
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}  # keep retry tests quick


async def PUBLIC_DNS(host: str, port: int) -> list[str]:  # noqa: N802 - a constant-like stand-in
    """catalog.test and friends resolve to a public documentation address; no DNS query is made."""
    return ["93.184.215.14"]


def fetch(url: str, **policy) -> bytes:
    async def run() -> bytes:
        async with ImageFetcher(DownloadPolicy(**{**FAST, **policy})) as fetcher:
            return await fetcher.fetch(url)

    return asyncio.run(run())


def rejected(url: str, **policy) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        fetch(url, **policy)
    return caught.value


@pytest.fixture
def server(dev_server) -> DevServer:
    return dev_server(images={"a.jpg": BODY})


def image_requests(server: DevServer) -> list[str]:
    return server.paths("/images/")


def test_downloads_the_body(server):
    assert fetch(server.image_url("a.jpg")) == BODY


def test_server_errors_are_retried_until_success(server):
    server.inject("/images/a.jpg", [Fault(status=500), Fault(status=503)])

    assert fetch(server.image_url("a.jpg"), max_retries=3) == BODY
    assert [r.status for r in server.requests] == [500, 503, 200]


def test_gives_up_after_max_retries(server):
    server.inject("/images/a.jpg", [Fault(status=503)] * 10)

    error = rejected(server.image_url("a.jpg"), max_retries=2)

    assert error.reason is RejectReason.HTTP_ERROR
    assert "503" in error.message and "3 attempts" in error.message
    assert len(image_requests(server)) == 3


def test_not_found_is_rejected_without_retrying(server):
    error = rejected(server.image_url("missing.jpg"), max_retries=3)

    assert error.reason is RejectReason.HTTP_ERROR
    assert error.message.startswith("http_error: HTTP 404")
    assert len(image_requests(server)) == 1


def test_retry_after_is_honoured(server):
    server.inject("/images/a.jpg", [Fault(status=429, retry_after=1)])

    started = time.monotonic()
    assert fetch(server.image_url("a.jpg")) == BODY
    elapsed = time.monotonic() - started

    assert elapsed >= 0.95  # the server's second, not the 10 ms backoff
    assert [r.status for r in server.requests] == [429, 200]


def test_retry_after_is_capped(server):
    server.inject("/images/a.jpg", [Fault(status=503, retry_after=60)])

    started = time.monotonic()
    assert fetch(server.image_url("a.jpg"), retry_after_max_s=0.1) == BODY
    assert time.monotonic() - started < 5


def test_declared_content_length_over_the_limit_is_rejected(server):
    error = rejected(server.image_url("a.jpg"), max_bytes=1000, max_retries=3)

    assert error.reason is RejectReason.TOO_LARGE
    assert "Content-Length 2048" in error.message
    assert len(image_requests(server)) == 1  # too large is permanent


def test_streamed_body_over_the_limit_is_cut_off():
    """No Content-Length: the fetcher must count bytes as they arrive and stop early."""
    sent = []

    async def endless():
        while True:
            sent.append(1)
            yield b"x" * 1024

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=endless()))

    async def run() -> None:
        policy = DownloadPolicy(max_bytes=10 * 1024)
        async with ImageFetcher(policy, transport=transport, resolver=PUBLIC_DNS) as fetcher:
            await fetcher.fetch("http://catalog.test/huge.jpg")

    with pytest.raises(ImageRejected) as caught:
        asyncio.run(run())

    assert caught.value.reason is RejectReason.TOO_LARGE
    assert len(sent) <= 12  # stopped right after the limit, not at the end of an endless body


def test_slow_response_times_out(server):
    server.inject("/images/a.jpg", [Fault(delay_s=3)])

    started = time.monotonic()
    error = rejected(server.image_url("a.jpg"), timeout_s=0.3, max_retries=0)

    assert error.reason is RejectReason.TIMEOUT
    assert time.monotonic() - started < 2


def test_timeout_is_retried(server):
    server.inject("/images/a.jpg", [Fault(delay_s=3)])

    assert fetch(server.image_url("a.jpg"), timeout_s=0.3, max_retries=1) == BODY


def test_body_cut_short_is_retried_then_reported(server):
    server.inject("/images/a.jpg", [Fault(truncate_to=100)])
    assert fetch(server.image_url("a.jpg"), max_retries=1) == BODY

    server.inject("/images/a.jpg", [Fault(truncate_to=100)] * 3)
    error = rejected(server.image_url("a.jpg"), max_retries=2)
    assert error.reason is RejectReason.CONNECTION_ERROR


def test_refused_connection_is_a_connection_error():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    error = rejected(f"http://127.0.0.1:{port}/a.jpg", max_retries=1)

    assert error.reason is RejectReason.CONNECTION_ERROR


def test_unsupported_url_is_rejected_at_once():
    assert rejected("ftp://127.0.0.1/a.jpg").reason is RejectReason.BAD_URL


def test_concurrency_is_bounded():
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=b"ok")

    async def run(concurrency: int) -> list[bytes]:
        async with ImageFetcher(
            DownloadPolicy(concurrency=concurrency),
            transport=httpx.MockTransport(handler),
            resolver=PUBLIC_DNS,
        ) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(f"http://catalog.test/{i}.jpg") for i in range(60)))

    for concurrency in (4, 20):  # one client, and connections spread over several
        peak = 0
        assert asyncio.run(run(concurrency)) == [b"ok"] * 60
        assert peak == concurrency


def test_parse_retry_after():
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)

    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(90)
    assert (
        parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now=now.timestamp()) == 0.0
    )
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


# --- only public addresses are fetched (nothing here leaves the machine: the DNS answers are injected
# and the blocked targets are checked before any connection) -----------------------------------------


def fetch_with(url: str, handler, resolver=None, **policy) -> bytes:
    async def run() -> bytes:
        transport = httpx.MockTransport(handler)
        async with ImageFetcher(
            DownloadPolicy(**{**FAST, **policy}), transport=transport, resolver=resolver
        ) as f:
            return await f.fetch(url)

    return asyncio.run(run())


def recording_handler(seen: list[str], redirect_to: str | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if redirect_to is not None:
            return httpx.Response(302, headers={"Location": redirect_to})
        return httpx.Response(200, content=BODY)

    return handler


def fake_dns(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://127.0.0.1:8080/a.jpg",  # loopback
        "http://[::1]/a.jpg",
        "http://10.1.2.3/a.jpg",  # private
        "http://[::ffff:192.168.0.1]/a.jpg",  # private, IPv4-mapped
        "http://0.0.0.0/a.jpg",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(url):
    seen: list[str] = []
    with pytest.raises(ImageRejected) as caught:
        fetch_with(url, recording_handler(seen), allowed_networks=())
    assert caught.value.reason is RejectReason.BLOCKED_ADDRESS
    assert "refused before connecting" in caught.value.detail
    assert seen == []


def test_a_hostname_resolving_into_a_private_network_is_refused():
    seen: list[str] = []
    dns = fake_dns({"images.example.com": ["93.184.215.14", "10.0.0.7"]})  # one bad answer is enough
    with pytest.raises(ImageRejected) as caught:
        fetch_with("https://images.example.com/a.jpg", recording_handler(seen), dns, allowed_networks=())
    assert caught.value.reason is RejectReason.BLOCKED_ADDRESS and "10.0.0.7 (private)" in caught.value.detail
    assert seen == []


def test_a_redirect_to_the_metadata_service_is_never_followed():
    seen: list[str] = []
    dns = fake_dns({"images.example.com": ["93.184.215.14"]})
    handler = recording_handler(seen, redirect_to="http://169.254.169.254/latest/meta-data/iam")
    with pytest.raises(ImageRejected) as caught:
        fetch_with("https://images.example.com/a.jpg", handler, dns, allowed_networks=())
    assert caught.value.reason is RejectReason.BLOCKED_ADDRESS and "link-local" in caught.value.detail
    assert seen == ["https://images.example.com/a.jpg"]  # the redirect target was never contacted


def test_public_redirects_are_followed_and_allowed_networks_are_fetched():
    seen: list[str] = []
    dns = fake_dns({"a.example.com": ["93.184.215.14"], "cdn.example.com": ["151.101.1.1"]})

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "a.example.com":
            return httpx.Response(301, headers={"Location": "https://cdn.example.com/a.jpg"})
        return httpx.Response(200, content=BODY)

    assert fetch_with("https://a.example.com/a.jpg", handler, dns, allowed_networks=()) == BODY
    assert seen == ["https://a.example.com/a.jpg", "https://cdn.example.com/a.jpg"]
    assert (
        fetch_with("http://10.1.2.3/a.jpg", recording_handler([]), allowed_networks=("10.0.0.0/8",)) == BODY
    )


def test_redirect_loops_are_cut_off():
    dns = fake_dns({"a.example.com": ["93.184.215.14"]})
    handler = recording_handler([], redirect_to="https://a.example.com/again")
    with pytest.raises(ImageRejected, match="more than 3 redirects"):
        fetch_with("https://a.example.com/a.jpg", handler, dns, allowed_networks=(), max_redirects=3)


def test_the_real_server_is_reachable_only_when_loopback_is_allowed(server):
    """The suite allows 127.0.0.0/8 through PSEUDOLABEL_ALLOWED_IMAGE_NETWORKS; production does not."""
    assert fetch(server.image_url("a.jpg")) == BODY
    assert rejected(server.image_url("a.jpg"), allowed_networks=()).reason is RejectReason.BLOCKED_ADDRESS
    assert image_requests(server) == ["/images/a.jpg"]  # the refused attempt never reached the server
