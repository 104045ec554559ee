"""Checkpoint resolution: local / URL (a 127.0.0.1 server) / s3 / random, sha256 checks, clear errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading

import pytest

from pseudolabel.models import grounding_dino_build, sam2_segmenter
from pseudolabel.models.checkpoints import (
    CACHE_ENV,
    FIRST_SEEN,
    RANDOM_WEIGHTS,
    RECORDED,
    UNPINNED,
    VERIFIED,
    CheckpointNotFound,
    CheckpointSpec,
    ChecksumMismatch,
    HubModel,
    default_cache_dir,
    resolve_checkpoint,
    resolve_pretrained_dir,
)

PAYLOAD = b"not really a checkpoint\n" * 1000
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
WRONG = "0" * 64


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (base_url, handler class, shutdown)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.pth").write_bytes(PAYLOAD)
    handler = type("Handler", (_Handler,), {"requests": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler, httpd.shutdown
    finally:
        httpd.shutdown()
        httpd.server_close()


def _spec(url: str, sha256: str | None = None) -> CheckpointSpec:
    return CheckpointSpec("Test model", "model.pth", url, sha256)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.pth"  # nothing listens there once the socket is closed


def test_official_download_is_verified_cached_and_reused_offline(server, tmp_path):
    base, handler, shutdown = server
    cache = tmp_path / "cache"
    resolved = resolve_checkpoint("", _spec(f"{base}/model.pth", DIGEST), cache_dir=cache)
    assert resolved.path == cache / "model.pth" and resolved.path.read_bytes() == PAYLOAD
    assert (resolved.sha256, resolved.status) == (DIGEST, VERIFIED)
    assert handler.requests == 1
    shutdown()  # offline from now on: the cache must suffice
    again = resolve_checkpoint("official", _spec(f"{base}/model.pth", DIGEST), cache_dir=cache)
    assert again.path == resolved.path and handler.requests == 1


def test_download_with_wrong_digest_fails_and_leaves_nothing(server, tmp_path):
    base, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatch, match=DIGEST):
        resolve_checkpoint("", _spec(f"{base}/model.pth", WRONG), cache_dir=cache)
    assert list(cache.iterdir()) == []  # no partial or unverified file left behind


def test_tampered_cache_is_an_error_not_a_silent_redownload(server, tmp_path):
    base, handler, _ = server
    cache = tmp_path / "cache"
    resolve_checkpoint("", _spec(f"{base}/model.pth", DIGEST), cache_dir=cache)
    (cache / "model.pth").write_bytes(b"corrupted")
    with pytest.raises(ChecksumMismatch, match="delete"):
        resolve_checkpoint("", _spec(f"{base}/model.pth", DIGEST), cache_dir=cache)
    assert handler.requests == 1 and (cache / "model.pth").read_bytes() == b"corrupted"


def test_unpinned_digest_is_recorded_on_first_download_then_enforced(server, tmp_path):
    base, _, _ = server
    cache = tmp_path / "cache"
    url = f"{base}/model.pth"
    first = resolve_checkpoint(url, _spec("unused"), cache_dir=cache)
    assert (first.status, first.sha256, first.source) == (FIRST_SEEN, DIGEST, url)
    assert (cache / "model.pth.sha256").read_text().split()[0] == DIGEST
    assert resolve_checkpoint(url, _spec("unused"), cache_dir=cache).status == RECORDED
    (cache / "model.pth").write_bytes(b"swapped")
    with pytest.raises(ChecksumMismatch, match="recorded at first download"):
        resolve_checkpoint(url, _spec("unused"), cache_dir=cache)


def test_missing_checkpoint_offline_says_what_where_and_how(tmp_path):
    url = _closed_port_url()
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointNotFound) as info:
        resolve_checkpoint("", _spec(url, DIGEST), cache_dir=cache, timeout_s=5)
    message = str(info.value)
    assert "model.pth" in message  # which file
    assert str(cache / "model.pth") in message and CACHE_ENV in message  # where it was looked for
    assert url in message  # where it would come from
    assert "local path" in message and "s3://" in message  # how to provide it
    assert not (cache / "model.pth").exists()

    with pytest.raises(CheckpointNotFound, match="allow_download=False"):
        resolve_checkpoint("", _spec(url, DIGEST), cache_dir=cache, allow_download=False)


def test_local_path(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(PAYLOAD)
    resolved = resolve_checkpoint(str(path), _spec("unused"), cache_dir=tmp_path / "cache")
    assert (resolved.path, resolved.sha256, resolved.status) == (path, DIGEST, UNPINNED)
    assert resolve_checkpoint(str(path), _spec("unused"), expected_sha256=DIGEST.upper()).status == VERIFIED
    with pytest.raises(ChecksumMismatch):
        resolve_checkpoint(str(path), _spec("unused"), expected_sha256=WRONG)
    with pytest.raises(CheckpointNotFound, match=str(tmp_path / "absent.pth")):
        resolve_checkpoint(str(tmp_path / "absent.pth"), _spec("unused"))


def test_s3_source_goes_through_the_getter_and_the_cache(tmp_path):
    calls = []
    objects = {"s3://bucket/models/model.pth": PAYLOAD}

    def s3_get(uri):
        calls.append(uri)
        if uri not in objects:
            raise KeyError(uri)
        return objects[uri]

    cache = tmp_path / "cache"
    resolved = resolve_checkpoint(
        "s3://bucket/models/model.pth",
        _spec("unused"),
        cache_dir=cache,
        s3_get=s3_get,
        expected_sha256=DIGEST,
    )
    assert resolved.path == cache / "s3" / "bucket" / "models" / "model.pth" and resolved.status == VERIFIED
    resolve_checkpoint("s3://bucket/models/model.pth", _spec("unused"), cache_dir=cache, s3_get=s3_get)
    assert calls == ["s3://bucket/models/model.pth"]  # second time from the cache
    with pytest.raises(CheckpointNotFound, match="s3://bucket/other.pth"):
        resolve_checkpoint("s3://bucket/other.pth", _spec("unused"), cache_dir=cache, s3_get=s3_get)


def test_random_and_cache_dir_default(monkeypatch, tmp_path):
    resolved = resolve_checkpoint("random", _spec("unused"))
    assert resolved.is_random and resolved.path is None and resolved.status == RANDOM_WEIGHTS
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_ENV)
    assert str(default_cache_dir()).endswith(".cache/pseudolabel")


def test_official_tables_cover_every_variant():
    urls = {v.checkpoint.url for v in grounding_dino_build.VARIANTS.values()} | {
        v.checkpoint.url for v in sam2_segmenter.VARIANTS.values()
    }
    assert len(urls) == 6 and all(url.startswith("https://") for url in urls)
    for variant in [*grounding_dino_build.VARIANTS.values(), *sam2_segmenter.VARIANTS.values()]:
        digest = variant.checkpoint.sha256
        assert digest is None or (len(digest) == 64 and int(digest, 16) >= 0)
        assert variant.checkpoint.url.endswith("/" + variant.checkpoint.filename)


# ---- Hugging Face model directories ---------------------------------------------------------------

HUB = HubModel("Tiny test model", "example/not-on-the-hub", revision="0123abcd", gated=True)


def _model_dir(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "x"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_local_model_directory_is_identified_by_its_weights(tmp_path):
    first = resolve_pretrained_dir(str(_model_dir(tmp_path / "a", b"w1")), HUB)
    assert first.path == tmp_path / "a" and first.status == UNPINNED
    (tmp_path / "a" / "config.json").write_text('{"model_type": "x", "note": "edited"}')
    assert resolve_pretrained_dir(str(tmp_path / "a"), HUB).sha256 == first.sha256  # config only
    (tmp_path / "a" / "model.safetensors").write_bytes(b"w2")
    assert resolve_pretrained_dir(str(tmp_path / "a"), HUB).sha256 != first.sha256
    with pytest.raises(CheckpointNotFound, match="no config.json"):
        resolve_pretrained_dir(str(tmp_path / "empty"), HUB)
    assert resolve_pretrained_dir("random", HUB).is_random


def test_an_s3_prefix_is_fetched_once_into_the_cache(tmp_path):
    fetched = []

    def list_get(uri):
        fetched.append(uri)
        return {"config.json": b'{"model_type": "x"}', "model.safetensors": b"w1", "sub/extra.bin": b"e"}

    source = "s3://bucket/models/tiny/"
    first = resolve_pretrained_dir(source, HUB, cache_dir=tmp_path, s3_list_get=list_get)
    assert (
        first.path == tmp_path / "s3" / "bucket" / "models/tiny"
        and (first.path / "sub" / "extra.bin").is_file()
    )
    again = resolve_pretrained_dir(source, HUB, cache_dir=tmp_path, s3_list_get=list_get)
    assert fetched == [source] and again.sha256 == first.sha256
    with pytest.raises(CheckpointNotFound, match="nothing under"):
        resolve_pretrained_dir("s3://bucket/none", HUB, cache_dir=tmp_path, s3_list_get=lambda uri: {})
    with pytest.raises(CheckpointNotFound, match="downloads are off"):
        resolve_pretrained_dir("s3://bucket/other", HUB, cache_dir=tmp_path, allow_download=False)


def test_the_hub_model_offline_names_its_pinned_revision_and_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointNotFound) as failure:
        resolve_pretrained_dir("", HUB, allow_download=False)
    message = str(failure.value)
    assert "hf://example/not-on-the-hub@0123abcd" in message and "HF_TOKEN" in message and "s3://" in message
