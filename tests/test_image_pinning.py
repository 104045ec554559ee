"""ImageFetcher connects to the address it checked: a DNS answer that changes between the check and the
connection (DNS rebinding) cannot send a download anywhere else.

Everything stays on the machine: names like ``images.test`` are answered by a stand-in for
``socket.getaddrinfo`` (the function both the fetcher and httpx's own connection code resolve through),
with 127.0.0.1 (allowed by the test's ``allowed_networks``) first and 127.0.0.2 (forbidden) afterwards.
A second server listens on 127.0.0.2, same port, serving different bytes: a download that reached it would
show up in its request log.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pseudolabel.images.download import DownloadPolicy, ImageFetcher, PinnedBackend
from pseudolabel.images.errors import ImageRejected, RejectReason
from pseudolabel.testing.servers import DevServer, Fault

CHECKED, FORBIDDEN = "127.0.0.1", "127.0.0.2"
ONLY_CHECKED = (f"{CHECKED}/32",)  # the test's networks setting: 127.0.0.2 is loopback, so refused
GOOD, EVIL = b"the checked server's image", b"the rebound address's image"


class ChangingDns:
    """``socket.getaddrinfo`` for the names in ``answers``: each name's answers in turn (the last one
    repeats); any other host (IP literals included) goes to the real function."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = {name: list(values) for name, values in answers.items()}
        self.asked: Counter[str] = Counter()
        self._real = socket.getaddrinfo

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 - socket's names
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self._real(host, port, family, type, proto, flags)
        self.asked[name] += 1
        queue = self.answers[name]
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]


@pytest.fixture
def servers() -> Iterator[tuple[DevServer, DevServer]]:
    """A server on the checked address and one on the forbidden address, on the same port."""
    with (
        DevServer(images={"a.jpg": GOOD}) as good,
        DevServer(images={"a.jpg": EVIL}, host=FORBIDDEN, port=good.bound_port) as evil,
    ):
        yield good, evil


def rebinding(monkeypatch, *names: str) -> ChangingDns:
    dns = ChangingDns({name: [CHECKED, FORBIDDEN] for name in names})
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns


def fetch(url: str, **policy) -> bytes:
    async def run() -> bytes:
        policy.setdefault("allowed_networks", ONLY_CHECKED)
        async with ImageFetcher(DownloadPolicy(max_retries=0, **policy)) as fetcher:
            return await fetcher.fetch(url)

    return asyncio.run(run())


def test_a_dns_answer_that_changes_after_the_check_is_never_connected_to(servers, monkeypatch):
    good, evil = servers
    dns = rebinding(monkeypatch, "images.test")

    assert fetch(f"http://images.test:{good.bound_port}/images/a.jpg") == GOOD

    assert evil.requests == []  # the rebound answer was never connected to
    assert dns.asked["images.test"] == 1  # resolved once: the connection used the checked answer
    assert good.paths() == ["/images/a.jpg"]
    assert good.request_hosts == [f"images.test:{good.bound_port}"]  # the original Host header


def test_each_redirect_hop_connects_to_its_own_checked_address(servers, monkeypatch):
    good, evil = servers
    dns = rebinding(monkeypatch, "images.test", "cdn.test")
    good.inject(
        "/images/moved.jpg", [Fault(status=302, location=f"http://cdn.test:{good.bound_port}/images/a.jpg")]
    )

    assert fetch(f"http://images.test:{good.bound_port}/images/moved.jpg") == GOOD

    assert evil.requests == []
    assert dns.asked == {"images.test": 1, "cdn.test": 1}
    assert good.paths() == ["/images/moved.jpg", "/images/a.jpg"]
    assert good.request_hosts == [f"images.test:{good.bound_port}", f"cdn.test:{good.bound_port}"]


def test_a_forbidden_first_answer_is_refused_before_any_connection(servers, monkeypatch):
    good, evil = servers
    dns = ChangingDns({"images.test": [FORBIDDEN, CHECKED]})
    monkeypatch.setattr(socket, "getaddrinfo", dns)

    with pytest.raises(ImageRejected) as caught:
        fetch(f"http://images.test:{good.bound_port}/images/a.jpg")

    assert caught.value.reason is RejectReason.BLOCKED_ADDRESS
    assert f"{FORBIDDEN} (loopback)" in caught.value.detail
    assert good.requests == evil.requests == []
    assert dns.asked["images.test"] == 1  # refused on the first answer, not re-asked until it looks good


def test_keep_alive_connections_stay_on_the_checked_address(servers, monkeypatch):
    """Later requests to the same host are checked again (against a new answer) and reuse the pooled
    connection to the address checked first; a forbidden later answer is refused."""
    good, evil = servers
    monkeypatch.setattr(socket, "getaddrinfo", ChangingDns({"images.test": [CHECKED, CHECKED, FORBIDDEN]}))
    url = f"http://images.test:{good.bound_port}/images/a.jpg"

    async def run() -> tuple[list[bytes], ImageRejected]:
        async with ImageFetcher(DownloadPolicy(max_retries=0, allowed_networks=ONLY_CHECKED)) as fetcher:
            bodies = [await fetcher.fetch(url), await fetcher.fetch(url)]
            with pytest.raises(ImageRejected) as caught:
                await fetcher.fetch(url)
            return bodies, caught.value

    bodies, third = asyncio.run(run())

    assert bodies == [GOOD, GOOD] and third.reason is RejectReason.BLOCKED_ADDRESS
    assert evil.requests == [] and good.paths() == ["/images/a.jpg"] * 2


# -- https: the certificate is checked against the URL's name, sent as SNI -----------------------------


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None = None):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder


def tls_files(tmp_path: Path, hostname: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for ``hostname`` only (not for any IP): (ca, cert, key) files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("pseudolabel test CA", ca_key).sign(ca_key, hashes.SHA256())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(hostname, key, issuer=ca).sign(ca_key, hashes.SHA256())
    files = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def test_https_connects_to_the_checked_address_with_the_names_sni_and_certificate(tmp_path, monkeypatch):
    ca, cert, key = tls_files(tmp_path, "images.test")
    server_names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda _socket, name, _context: server_names.append(name)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the fetcher's context trusts the test CA
    dns = rebinding(monkeypatch, "images.test")

    with (
        DevServer(images={"a.jpg": GOOD}, tls=tls) as good,
        DevServer(images={"a.jpg": EVIL}, host=FORBIDDEN, port=good.bound_port, tls=tls) as evil,
    ):
        assert good.url.startswith("https://")
        port = good.bound_port
        assert fetch(f"https://images.test:{port}/images/a.jpg") == GOOD

    assert server_names == ["images.test"]  # SNI is the URL's name, not the pinned address
    assert good.request_hosts == [f"images.test:{port}"]
    assert evil.requests == [] and dns.asked["images.test"] == 1
    # The certificate names images.test only: reaching the same server by its address fails verification.
    with pytest.raises(ImageRejected) as caught, DevServer(images={"a.jpg": GOOD}, tls=tls) as direct:
        fetch(direct.image_url("a.jpg"), allowed_networks=("127.0.0.0/8",))
    assert caught.value.reason is RejectReason.CONNECTION_ERROR and "CERTIFICATE_VERIFY_FAILED" in str(
        caught.value
    )


def test_the_backend_tries_the_checked_addresses_in_turn_and_refuses_unchecked_hosts(servers):
    good, evil = servers
    port = good.bound_port

    async def two_answers(host: str, port: int) -> list[str]:
        return ["127.0.0.3", CHECKED]  # nothing listens on the first: the next checked one is tried

    async def run() -> bytes:
        policy = DownloadPolicy(max_retries=0, allowed_networks=("127.0.0.0/8",))
        async with ImageFetcher(policy, resolver=two_answers) as fetcher:
            return await fetcher.fetch(f"http://images.test:{port}/images/a.jpg")

    assert asyncio.run(run()) == GOOD and evil.requests == []

    async def unchecked() -> None:  # no pin for the host: refused, not resolved
        await PinnedBackend().connect_tcp("localhost", port)

    with pytest.raises(httpcore.ConnectError, match="was not checked"):
        asyncio.run(unchecked())
    assert good.paths() == ["/images/a.jpg"]
