"""A local HTTP catalog + image server for tests, benchmarks and the demo (stdlib only).

    with DevServer(catalog=[{"image_url": ..., "label": "oak"}], images={"a.jpg": b"..."}) as server:
        server.catalog_url          # http://127.0.0.1:<port>/api/trees?offset=O&limit=N
        server.image_url("a.jpg")   # http://127.0.0.1:<port>/images/a.jpg

The catalog is a list of item dicts or a callable ``(offset, limit) -> list[dict]`` with an explicit
``total`` (so a 15M-row synthetic catalog never exists in memory). Tests can inject faults per path
prefix (consumed in order, one per matching request) and read ``server.requests`` afterwards.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

CATALOG_PATH = "/api/trees"
IMAGES_PATH = "/images/"
DEFAULT_PAGE_LIMIT = 100

CatalogPage = Callable[[int, int], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, applied to a single matching request.

    ``status``: answer with this status instead (``retry_after`` adds a Retry-After header: seconds,
    or a string sent as is, e.g. an HTTP date);
    ``body``: answer 200 (or ``status``) with these bytes instead of the real body;
    ``truncate_to``: announce the full Content-Length, send only this many bytes, drop the connection;
    ``delay_s``: sleep before answering (longer than the client's timeout = a timeout);
    ``location``: send this Location header (with ``status=302`` and friends: a redirect).
    """

    status: int | None = None
    retry_after: float | str | None = None
    body: bytes | None = None
    truncate_to: int | None = None
    delay_s: float = 0.0
    location: str | None = None


class LoggedRequest(NamedTuple):
    path: str  # request target including the query string
    status: int


class DevServer:
    """A threaded HTTP server on 127.0.0.1 (a free port unless ``port``) in a daemon thread.

    ``host`` binds another loopback address (127.0.0.2 is a second machine as far as a client can tell);
    ``tls`` serves HTTPS with that server-side context. ``request_hosts`` logs each request's Host header.
    """

    def __init__(
        self,
        catalog: Sequence[Mapping[str, Any]] | CatalogPage = (),
        images: Mapping[str, bytes] | None = None,
        *,
        total: int | None = None,
        items_key: str = "trees",
        report_total: bool = True,
        latency_s: float = 0.0,
        catalog_latency_s: float | None = None,
        image_latency_s: float | None = None,
        required_token: str | None = None,
        max_limit: int | None = None,
        log_requests: bool = True,
        port: int = 0,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ):
        if callable(catalog):
            if total is None:
                raise ValueError("a callable catalog needs total=<number of items>")
            self._page: CatalogPage = catalog
            self.total = total
        else:
            items = list(catalog)
            self._page = lambda offset, limit: items[offset : offset + limit]
            self.total = len(items) if total is None else total
        # Kept by reference: a test may add images after the server started.
        self.images: Mapping[str, bytes] = images if images is not None else {}
        self.items_key = items_key
        self.report_total = report_total
        self.catalog_latency_s = latency_s if catalog_latency_s is None else catalog_latency_s
        self.image_latency_s = latency_s if image_latency_s is None else image_latency_s
        self.required_token = required_token
        self.max_limit = max_limit  # emulate APIs that silently cap the page size
        self.log_requests = log_requests  # off for long benchmarks (the log grows per request)
        self.port = port  # 0: any free port (tests); fixed for a demo others point a browser at
        self.host = host
        self.tls = tls
        self.requests: list[LoggedRequest] = []
        self.request_hosts: list[str] = []  # the Host header of each logged request, in the same order
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()  # wakes requests sleeping on latency/delay at shutdown
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DevServer:
        if self._httpd is not None:
            return self
        self._closing.clear()
        self._httpd = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        if self.tls is not None:  # handshakes happen in each request's thread, on first read
            self._httpd.socket = self.tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        # A short poll interval makes close() (which waits for the serve loop to notice) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="devserver", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("DevServer is not started (use it as a context manager or call start())")
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}"

    @property
    def bound_port(self) -> int:
        """The port it listens on (the free one it picked when ``port`` was 0)."""
        if self._httpd is None:
            raise RuntimeError("DevServer is not started (use it as a context manager or call start())")
        return int(self._httpd.server_address[1])

    @property
    def catalog_url(self) -> str:
        return self.url + CATALOG_PATH

    def image_url(self, name: str) -> str:
        return self.url + IMAGES_PATH + name

    # -- fault injection and the request log --------------------------------------------------

    def inject(self, path_prefix: str, faults: Iterable[Fault]) -> None:
        """Queue ``faults`` for requests whose target starts with ``path_prefix`` (one per request).

        The target includes the query, so ``"/api/trees?offset=1000&"`` aims at a single page.
        """
        with self._lock:
            self._faults.setdefault(path_prefix, deque()).extend(faults)

    def paths(self, prefix: str = "") -> list[str]:
        """Logged request targets starting with ``prefix``, in arrival order."""
        with self._lock:
            return [r.path for r in self.requests if r.path.startswith(prefix)]

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            for prefix, queue in self._faults.items():
                if queue and path.startswith(prefix):
                    return queue.popleft()
        return None

    def _log(self, path: str, status: int, host: str = "") -> None:
        if self.log_requests:
            with self._lock:
                self.requests.append(LoggedRequest(path, int(status)))
                self.request_hosts.append(host)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closing.wait(seconds)

    # -- routes ------------------------------------------------------------------------------

    def _catalog_response(self, query: str) -> tuple[int, bytes, str]:
        params = parse_qs(query)
        try:
            offset = int(params.get("offset", ["0"])[0])
            limit = int(params.get("limit", [str(DEFAULT_PAGE_LIMIT)])[0])
        except ValueError:
            return _text(HTTPStatus.BAD_REQUEST, "offset and limit must be integers")
        if offset < 0 or limit < 0:
            return _text(HTTPStatus.BAD_REQUEST, "offset and limit must be >= 0")
        if self.max_limit is not None:
            limit = min(limit, self.max_limit)
        limit = max(0, min(limit, self.total - offset))
        items = list(self._page(offset, limit)) if limit else []
        payload: dict[str, Any] = {self.items_key: items}
        if self.report_total:
            payload["total"] = self.total
        return HTTPStatus.OK, json.dumps(payload).encode(), "application/json"

    def _image_response(self, name: str) -> tuple[int, bytes, str]:
        data = self.images.get(name)
        if data is None:
            return _text(HTTPStatus.NOT_FOUND, f"no image {name!r}")
        return HTTPStatus.OK, data, mimetypes.guess_type(name)[0] or "image/jpeg"


def _text(status: int, message: str) -> tuple[int, bytes, str]:
    return status, message.encode(), "text/plain; charset=utf-8"


def _handler_for(server: DevServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as real APIs allow

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # tests read server.requests; stderr noise helps nobody

        def _serve(self, send_body: bool) -> None:
            split = urlsplit(self.path)
            fault = server._next_fault(self.path)
            if fault is not None:
                server._sleep(fault.delay_s)
            if split.path.startswith(IMAGES_PATH):
                server._sleep(server.image_latency_s)
            else:
                server._sleep(server.catalog_latency_s)
            if server._closing.is_set():
                self.close_connection = True
                return
            status, body, content_type = self._route(split.path, split.query)
            headers: dict[str, str] = {}
            if fault is not None and fault.status is not None:
                status, body, content_type = _text(fault.status, f"injected {fault.status}")
                if isinstance(fault.retry_after, str):
                    headers["Retry-After"] = fault.retry_after
                elif fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
            if fault is not None and fault.location is not None:
                headers["Location"] = fault.location
            if fault is not None and fault.body is not None:
                body, content_type = fault.body, "application/octet-stream"
            server._log(self.path, status, self.headers.get("Host", ""))
            self._respond(status, body, content_type, headers, send_body, fault)

        def _route(self, path: str, query: str) -> tuple[int, bytes, str]:
            if server.required_token is not None:
                expected = f"Bearer {server.required_token}"
                if self.headers.get("Authorization") != expected:
                    return _text(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            if path == CATALOG_PATH:
                return server._catalog_response(query)
            if path.startswith(IMAGES_PATH):
                return server._image_response(unquote(path[len(IMAGES_PATH) :]))
            return _text(HTTPStatus.NOT_FOUND, f"no route {path}")

        def _respond(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: dict[str, str],
            send_body: bool,
            fault: Fault | None,
        ) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                if fault is not None and fault.truncate_to is not None:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if send_body:
                        self.wfile.write(body[: fault.truncate_to])
                    self.close_connection = True  # the client sees a body shorter than announced
                    return
                self.end_headers()
                if send_body:
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (e.g. timed out); nothing to do

    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pseudolabel.testing.servers --rows 100000``: serve a synthetic catalog until Ctrl-C."""
    import argparse

    from pseudolabel.testing.catalogs import SyntheticCatalog

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--no-total", action="store_true", help="do not report a top-level total")
    args = parser.parse_args(argv)
    catalog = SyntheticCatalog(total=args.rows)
    server = DevServer(
        catalog,
        total=args.rows,
        report_total=not args.no_total,
        latency_s=args.latency_ms / 1000,
        log_requests=False,
        port=args.port,
    )
    with server:
        print(f"catalog: {server.catalog_url}  ({args.rows:,} rows)  Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
