"""Async image download: bounded concurrency, a deadline per attempt, retries, a size cap.

Transient failures (5xx, 408, 429, timeouts, dropped connections) are retried with jittered
exponential backoff, or after the server's ``Retry-After`` when it sends one. Permanent ones
(other 4xx, bad URLs, oversized bodies) fail at once. Every failure surfaces as
:class:`ImageRejected`, so the caller quarantines the item instead of failing the shard.

Only public addresses are fetched: before every request, the first and each redirect target, the
host is resolved and refused if any of its addresses is private, loopback, link-local (the cloud
metadata service at 169.254.169.254), multicast, reserved or unspecified, unless it lies in
``DownloadPolicy.allowed_networks`` (``$PSEUDOLABEL_ALLOWED_IMAGE_NETWORKS``, e.g. ``127.0.0.0/8``
for a local test server). A refused URL is quarantined as ``blocked_address`` without a connection
being made.

The connection goes to the address that was checked: each hop resolves its host once, and the
connection pool's network backend (:class:`PinnedBackend`) connects only to the addresses checked for
that host in this attempt, so a DNS answer that changes between the check and the connection (DNS
rebinding) reaches nothing. The URL's host name is still what the server sees: in the ``Host`` header,
as the TLS server name (SNI), and in the certificate check. Environment proxies (``HTTPS_PROXY``...) are
not used for images: a proxy would resolve the name itself, after the check.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import httpcore
import httpx

from pseudolabel.images.errors import ImageRejected, RejectReason
from pseudolabel.retry import RetryableError, http_retrying, parse_retry_after

USER_AGENT = "pseudolabel-image-fetcher/0.1"
CONNECTIONS_PER_CLIENT = 8
RETRYABLE_STATUSES = frozenset({408, 425, 429})  # plus every 5xx
ALLOWED_NETWORKS_ENV = "PSEUDOLABEL_ALLOWED_IMAGE_NETWORKS"  # comma-separated CIDRs

# host, port -> the addresses it resolves to (tests inject one; no DNS traffic then).
Resolver = Callable[[str, int], Awaitable[list[str]]]


def allowed_networks_from_env() -> tuple[str, ...]:
    raw = os.environ.get(ALLOWED_NETWORKS_ENV, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class DownloadPolicy:
    concurrency: int = 32
    timeout_s: float = 30.0  # whole attempt: connect, headers and body
    max_retries: int = 3  # attempts = 1 + max_retries
    max_bytes: int = 50 * 1024 * 1024
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0  # never sleep longer than this, whatever the server asks
    max_redirects: int = 10
    # Non-public networks image URLs may still resolve into (read when the policy is made, at run time).
    allowed_networks: tuple[str, ...] = field(default_factory=allowed_networks_from_env)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0 or self.max_bytes <= 0 or self.max_retries < 0 or self.max_redirects < 0:
            raise ValueError(f"invalid download policy: {self}")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks / {ALLOWED_NETWORKS_ENV}: {exc}") from exc

    def blocked(self, address: str) -> str | None:
        """Why ``address`` may not be fetched, or None when it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
            return None
        for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
            if getattr(ip, f"is_{kind}"):
                return kind.replace("_", "-")
        return None if ip.is_global else "not globally routable"


# (host as httpcore sees it, port) -> the checked addresses a connection to it may use, set per attempt
# and hop. A context variable: each download task sees its own, and httpcore connects in that task.
_PINNED: contextvars.ContextVar[Mapping[tuple[str, int], tuple[str, ...]] | None] = contextvars.ContextVar(
    "pinned_image_addresses", default=None
)


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only to addresses the fetcher checked for the host.

    httpcore asks it for a TCP connection to the URL's host and port; instead of resolving that name
    again it connects to the addresses pinned for it (:data:`_PINNED`), in order, and refuses a host
    nothing was pinned for. TLS runs on top of the returned stream with the URL's host name as SNI.
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend | None = None):
        self._backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = (_PINNED.get() or {}).get((host, port))
        if not addresses:
            raise httpcore.ConnectError(f"{host}:{port} was not checked; refusing to connect")
        failure: Exception | None = None
        for address in addresses:  # like getaddrinfo-driven connects: the next address when one fails
            try:
                return await self._backend.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("images are not fetched over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request mapping, error mapping, pooling) over a :class:`PinnedBackend`.

    httpx does not take a network backend, so the pool it builds is replaced by an identical one that
    has it (``_pool`` is the attribute its request, ``__aexit__`` and ``aclose`` paths use).
    """

    def __init__(self, tls: ssl.SSLContext, limits: httpx.Limits):
        super().__init__(verify=tls, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend(),
        )


class _Transient(RetryableError):
    """An attempt failed in a way worth retrying; carries what to report if retries run out."""

    def __init__(self, reason: RejectReason, detail: str, retry_after_s: float | None = None):
        super().__init__(detail, retry_after_s)
        self.reason = reason
        self.detail = detail


class ImageFetcher:
    """Downloads URLs, at most ``policy.concurrency`` at a time. Use as ``async with``.

    Connections are spread over several small httpx clients rather than one big pool: httpcore
    scans (and polls) every pooled connection on each request, which at 32 connections cost
    more CPU than decoding the image. Each attempt goes to the least busy client, and the
    global semaphore guarantees that one always has a free connection.
    """

    def __init__(
        self,
        policy: DownloadPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
    ):
        self.policy = policy or DownloadPolicy()
        self._transport = transport  # tests swap in httpx.MockTransport (then nothing is pinned)
        self._resolve = resolver or _resolve
        self._slots = asyncio.Semaphore(self.policy.concurrency)
        self._clients: list[httpx.AsyncClient] = []
        self._in_flight: list[int] = []

    async def __aenter__(self) -> ImageFetcher:
        pools = math.ceil(self.policy.concurrency / CONNECTIONS_PER_CLIENT)
        per_pool = math.ceil(self.policy.concurrency / pools)
        tls = httpx.create_ssl_context()  # loading the CA bundle once, not once per client
        self._clients = [self._new_client(per_pool, tls) for _ in range(pools)]
        self._in_flight = [0] * pools
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()

    def _new_client(self, connections: int, tls: ssl.SSLContext) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.policy.timeout_s),
            follow_redirects=False,  # each redirect target is checked before it is contacted
            headers={"User-Agent": USER_AGENT},
            # An explicit transport also keeps httpx from routing through environment proxies.
            transport=self._transport or PinnedTransport(tls, limits),
        )

    async def fetch(self, url: str) -> bytes:
        """The body of ``url``; raises :class:`ImageRejected` once retries are exhausted."""
        body = _MemoryBody()
        await self._fetch(url, body)
        return bytes(body.data)

    async def fetch_to_file(self, url: str, file: BinaryIO) -> int:
        """Write the body of ``url`` into ``file`` (emptied first, and again before each retry) rather
        than memory, for large bodies such as videos; returns its size. Raises like :meth:`fetch`.

        The writes are small (one network chunk each) and made on the event loop: meant for local disk.
        """
        body = _FileBody(file)
        await self._fetch(url, body)
        return body.size

    async def _fetch(self, url: str, body: _Body) -> None:
        retrying = http_retrying(
            retry_on=_Transient,
            attempts=self.policy.max_retries + 1,
            backoff_initial_s=self.policy.backoff_initial_s,
            backoff_max_s=self.policy.backoff_max_s,
            retry_after_max_s=self.policy.retry_after_max_s,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # The slot is held for the attempt only, never while sleeping between attempts.
                    async with self._slots:
                        body.reset()
                        return await self._attempt_on_least_busy_client(url, body)
        except _Transient as exc:
            attempts = self.policy.max_retries + 1
            tries = f"{attempts} attempts" if attempts > 1 else "1 attempt, no retries"
            raise ImageRejected(exc.reason, f"{exc.detail} (gave up after {tries})") from None
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _attempt_on_least_busy_client(self, url: str, body: _Body) -> None:
        if not self._clients:
            raise RuntimeError("ImageFetcher is used outside `async with`")
        pick = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        self._in_flight[pick] += 1
        try:
            return await self._attempt(self._clients[pick], url, body)
        finally:
            self._in_flight[pick] -= 1

    async def _attempt(self, client: httpx.AsyncClient, url: str, body: _Body) -> None:
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                for _ in range(self.policy.max_redirects + 1):
                    pinned = _PINNED.set(await self._check_destination(url))
                    try:
                        async with client.stream("GET", url) as response:
                            if response.is_redirect and response.next_request is not None:
                                url = str(response.next_request.url)
                                continue
                            _check_status(response)
                            _check_declared_size(response, self.policy.max_bytes)
                            return await _read_capped(response, self.policy.max_bytes, body)
                    finally:
                        _PINNED.reset(pinned)
                raise ImageRejected(
                    RejectReason.HTTP_ERROR, f"more than {self.policy.max_redirects} redirects"
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _Transient(
                RejectReason.TIMEOUT, f"no complete response within {self.policy.timeout_s:g}s"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ImageRejected(RejectReason.BAD_URL, f"{url!r}: {exc}") from exc
        except httpx.TransportError as exc:
            raise _Transient(RejectReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}") from exc
        except (httpx.TooManyRedirects, httpx.DecodingError) as exc:
            raise ImageRejected(RejectReason.HTTP_ERROR, f"{type(exc).__name__}: {exc}") from exc

    async def _check_destination(self, url: str) -> dict[tuple[str, int], tuple[str, ...]]:
        """Refuse ``url`` before connecting when its host resolves to a non-public address; otherwise
        the addresses a connection for it may use, as ``{(host, port): addresses}`` to pin."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ImageRejected(RejectReason.BAD_URL, f"{url!r}: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ImageRejected(RejectReason.BAD_URL, f"{url!r}: only http(s) URLs with a host are fetched")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.raw_host.decode("ascii")  # what httpcore connects to (IDNA-encoded, IPv6 unbracketed)
        try:
            addresses = [str(ipaddress.ip_address(host))]  # an address literal needs no DNS
        except ValueError:
            addresses = None
        try:
            addresses = addresses or await self._resolve(host, port)
        except OSError as exc:  # DNS hiccups are worth a retry
            raise _Transient(RejectReason.CONNECTION_ERROR, f"cannot resolve {parsed.host}: {exc}") from exc
        if not addresses:
            raise _Transient(RejectReason.CONNECTION_ERROR, f"cannot resolve {parsed.host}: no addresses")
        for address in addresses:
            why = self.policy.blocked(address)
            if why:
                raise ImageRejected(
                    RejectReason.BLOCKED_ADDRESS,
                    f"{parsed.host} resolves to {address} ({why}); refused before connecting "
                    f"(allow a network with {ALLOWED_NETWORKS_ENV})",
                )
        return {(host, port): tuple(addresses)}


async def _resolve(host: str, port: int) -> list[str]:
    """The host's addresses in the resolver's order of preference (the order connections try them)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    detail = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise _Transient(
            RejectReason.HTTP_ERROR, detail, parse_retry_after(response.headers.get("Retry-After"))
        )
    if not response.is_success:
        raise ImageRejected(RejectReason.HTTP_ERROR, detail)


def _check_declared_size(response: httpx.Response, max_bytes: int) -> None:
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ImageRejected(
            RejectReason.TOO_LARGE, f"Content-Length {int(declared)} exceeds {max_bytes} bytes"
        )


class _Body:
    """Where a response body goes: ``reset`` before each attempt, then ``write`` per chunk."""

    size = 0

    def reset(self) -> None:
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)


class _MemoryBody(_Body):
    def __init__(self) -> None:
        self.data = bytearray()

    def reset(self) -> None:
        super().reset()
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        super().write(chunk)
        self.data += chunk


class _FileBody(_Body):
    def __init__(self, file: BinaryIO):
        self.file = file

    def reset(self) -> None:
        super().reset()
        self.file.seek(0)
        self.file.truncate()

    def write(self, chunk: bytes) -> None:
        super().write(chunk)
        self.file.write(chunk)


async def _read_capped(response: httpx.Response, max_bytes: int, body: _Body) -> None:
    # Servers may omit or understate Content-Length (or gzip a huge body): count what arrives.
    async for chunk in response.aiter_bytes():
        if body.size + len(chunk) > max_bytes:
            raise ImageRejected(RejectReason.TOO_LARGE, f"body exceeds {max_bytes} bytes")
        body.write(chunk)
