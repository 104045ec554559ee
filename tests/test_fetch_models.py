"""`pseudolabel fetch-models` from the orchestrator environment, against local servers on 127.0.0.1.

The default checkpoints (Grounding DINO swint_ogc, SAM2.1 large) come from a :class:`DevServer`
standing in for their release hosts (``$PSEUDOLABEL_CHECKPOINT_BASE_URL``), with digests pinned by
``$PSEUDOLABEL_CHECKPOINT_SHA256``; the text encoder (bert-base-uncased) comes from a minimal
Hugging Face hub API on 127.0.0.1 (``HF_ENDPOINT``), through the real ``huggingface_hub`` download
code of the worker environment. Served files are random bytes with known digests: nothing here loads
them as models. The URL paths served are read from the worker environment's own tables, so they cannot
drift from what production downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from test_readme_commands import readme_commands

from pseudolabel.models.checkpoints import (
    BASE_URL_ENV,
    FIRST_SEEN,
    SHA256_ENV,
    VERIFIED,
    CheckpointError,
    CheckpointNotFound,
    CheckpointSpec,
    ChecksumMismatch,
    official_url,
    pinned_sha256s,
    resolve_checkpoint,
)
from pseudolabel.testing.servers import IMAGES_PATH, DevServer, Fault
from pseudolabel.workers.environment import source_path_entry

REPO = Path(__file__).resolve().parents[1]
COMMAND = "pseudolabel fetch-models"  # the README's line, run as written
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT_ENCODER = "bert-base-uncased"
# What the hub repo holds: the files Grounding DINO reads, and weights of other frameworks it must skip.
HUB_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "vocab.txt": b"[PAD]\n[UNK]\nplant\n",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "model.safetensors": random.Random(3).randbytes(96 * 1024),
    "tf_model.h5": b"not wanted",
    "flax_model.msgpack": b"not wanted either",
}
SKIPPED_HUB_FILES = {"tf_model.h5", "flax_model.msgpack"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a minimal Hugging Face hub: the two routes snapshot_download uses ---------------------------------


class FakeHub:
    """``GET /api/models/<repo>/revision/<rev>`` (commit + file list) and ``HEAD|GET
    /<repo>/resolve/<rev>/<file>`` (X-Repo-Commit, ETag, size; the bytes) for one repo, on 127.0.0.1."""

    def __init__(self, repo: str, files: dict[str, bytes]):
        self.repo, self.files = repo, files
        self.requests: list[tuple[str, str]] = []  # (method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                hub._serve(self, send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub._serve(self, send_body=False)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def file_gets(self) -> list[str]:
        """Files whose bytes were sent (GETs of a resolve URL)."""
        marker = f"/{self.repo}/resolve/"
        return [
            p.split(marker, 1)[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and marker in p
        ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        status, body, headers = 404, b"not found", {"Content-Type": "text/plain"}
        if path.startswith(f"/api/models/{self.repo}/revision/"):
            info = {
                "id": self.repo,
                "modelId": self.repo,
                "sha": HUB_COMMIT,
                "private": False,
                "siblings": [{"rfilename": name} for name in self.files],
            }
            status, body, headers = 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
        elif path.startswith(f"/{self.repo}/resolve/"):
            name = path.split(f"/{self.repo}/resolve/", 1)[1].split("/", 1)[1]
            if name in self.files:
                body = self.files[name]
                status = 200
                headers = {
                    "Content-Type": "application/octet-stream",
                    "X-Repo-Commit": HUB_COMMIT,
                    "ETag": f'"{sha256(body)}"',
                }
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_checkpoints(worker_python: str) -> list[dict[str, str]]:
    """Name, file name and official URL of each default checkpoint, from the worker environment's tables
    (the ones ``fetch_default_checkpoints`` uses)."""
    program = (
        "import json\n"
        "from pseudolabel.models import grounding_dino_build as g, sam2_build as s\n"
        "from pseudolabel.models.loading import DetectorSpec as D, SegmenterSpec as S\n"
        "specs = [g.VARIANTS[D.variant].checkpoint, s.VARIANTS[S.variant].checkpoint]\n"
        "print(json.dumps([{'name': c.name, 'filename': c.filename, 'url': c.url} for c in specs]))\n"
    )
    env = {**os.environ, "PYTHONPATH": source_path_entry()}
    done = subprocess.run(
        [worker_python, "-c", program], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class Mirror:
    """The checkpoint files on a DevServer at their official paths under ``/images``, their bytes and
    pinned digests, a fake hub, and the environment a user would run ``pseudolabel fetch-models`` in."""

    def __init__(
        self, server: DevServer, hub: FakeHub, files: dict[str, bytes], urls: dict[str, str], tmp: Path
    ):
        self.server, self.hub, self.files, self.urls = server, hub, files, urls
        self.cache = tmp / "model-cache"
        self.hf_home = tmp / "hf-home"
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PSEUDOLABEL_CHECKPOINT_"))}
        self.env = env | {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # the activated orchestrator venv
            "PSEUDOLABEL_MODEL_CACHE": str(self.cache),
            BASE_URL_ENV: server.url + IMAGES_PATH.rstrip("/"),
            SHA256_ENV: ",".join(f"{name}={sha256(data)}" for name, data in files.items()),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(self.hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def path_of(self, filename: str) -> str:
        """The served path of ``filename``: the official URL's path under ``/images``."""
        return IMAGES_PATH.rstrip("/") + urlsplit(self.urls[filename]).path

    def downloads(self, filename: str) -> int:
        return sum(1 for r in self.server.requests if r.path == self.path_of(filename) and r.status == 200)

    def run(self) -> subprocess.CompletedProcess:
        """The README's command, as written, in the repo root, through a shell."""
        return subprocess.run(
            ["bash", "-c", COMMAND], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600
        )

    def hub_snapshot(self) -> Path:
        return self.hf_home / "hub" / f"models--{TEXT_ENCODER}" / "snapshots" / HUB_COMMIT


@pytest.fixture
def mirror(default_checkpoints, dev_server, tmp_path) -> Iterator[Mirror]:
    rng = random.Random(0)
    files = {c["filename"]: rng.randbytes(200 * 1024 + n) for n, c in enumerate(default_checkpoints)}
    urls = {c["filename"]: c["url"] for c in default_checkpoints}
    images = {urlsplit(urls[name]).path.lstrip("/"): data for name, data in files.items()}
    hub = FakeHub(TEXT_ENCODER, HUB_FILES)
    try:
        yield Mirror(dev_server(images=images), hub, files, urls, tmp_path)
    finally:
        hub.close()


# -- the README command ----------------------------------------------------------------------------


def test_fetch_models_downloads_verifies_and_caches(mirror: Mirror):
    """`pseudolabel fetch-models` as written: each default checkpoint is downloaded from the mirror,
    checked against its pinned sha256 and cached; the text encoder's five files come through the hub API
    (other frameworks' weights skipped). A second run downloads nothing."""
    assert COMMAND in readme_commands()
    done = mirror.run()
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    printed = [shlex.split(line) for line in done.stdout.strip().splitlines()]
    for name, data in mirror.files.items():
        cached = mirror.cache / name
        assert cached.read_bytes() == data
        assert [str(cached), f"sha256={sha256(data)}", VERIFIED] in printed, done.stdout
        assert mirror.downloads(name) == 1
    snapshot = mirror.hub_snapshot()
    assert [str(snapshot), "sha256=-", "unpinned"] in printed
    wanted = set(HUB_FILES) - SKIPPED_HUB_FILES
    assert {p.name for p in snapshot.iterdir()} == wanted
    assert all((snapshot / n).read_bytes() == HUB_FILES[n] for n in wanted)
    assert sorted(mirror.hub.file_gets()) == sorted(wanted)
    assert sorted(p.name for p in mirror.cache.iterdir()) == sorted(mirror.files)  # no temp files left

    requests_before = len(mirror.server.requests)
    again = mirror.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stdout.splitlines()] == done.stdout.splitlines()
    assert len(mirror.server.requests) == requests_before  # checkpoints: not even a request
    assert sorted(mirror.hub.file_gets()) == sorted(wanted)  # hub: metadata only, no file sent again


def test_a_corrupted_download_is_refused_and_not_cached(mirror: Mirror):
    """A download whose sha256 differs from the pin fails the command, naming the file and both
    digests; nothing of it stays in the cache, and the next run (good bytes again) fetches it."""
    grounding_dino, sam2 = mirror.files  # the table's order: detector, segmenter
    corrupted = bytearray(mirror.files[sam2])
    corrupted[1000] ^= 0xFF
    mirror.server.inject(mirror.path_of(sam2), [Fault(body=bytes(corrupted))])
    done = mirror.run()
    assert done.returncode == 1, (done.stdout, done.stderr[-3000:])
    error = done.stderr
    assert f"'{sam2}'" in error and sha256(bytes(corrupted)) in error and sha256(mirror.files[sam2]) in error
    assert "Refused" in error and "not stored in the cache" in error and "Traceback" not in error
    assert f"${SHA256_ENV}" in error  # where the expected digest came from
    assert sorted(p.name for p in mirror.cache.iterdir()) == [grounding_dino]  # no sam2 file, no temp file

    again = mirror.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (mirror.cache / sam2).read_bytes() == mirror.files[sam2]
    assert mirror.downloads(grounding_dino) == 1 and mirror.downloads(sam2) == 2


# -- the override, in process (no worker environment needed) ------------------------------------------


def test_the_base_url_replaces_scheme_and_host_and_keeps_the_path():
    url = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    assert official_url(url, {}) == url
    assert official_url(url, {BASE_URL_ENV: "http://127.0.0.1:8000"}) == (
        "http://127.0.0.1:8000/segment_anything_2/092824/sam2.1_hiera_large.pt"
    )
    assert official_url(url, {BASE_URL_ENV: "https://mirror.internal/models/"}) == (
        "https://mirror.internal/models/segment_anything_2/092824/sam2.1_hiera_large.pt"
    )
    for bad in ("mirror.internal", "ftp://mirror/x", "http://mirror/?q=1"):
        with pytest.raises(CheckpointError, match=BASE_URL_ENV):
            official_url(url, {BASE_URL_ENV: bad})


def test_digest_pins_parse_and_a_malformed_one_is_an_error():
    a, b = "a" * 64, "B" * 64
    assert pinned_sha256s({}) == {}
    assert pinned_sha256s({SHA256_ENV: f"x.pt={a}, y.pth={b}\nz.pt={a}"}) == {
        "x.pt": a,
        "y.pth": b.lower(),
        "z.pt": a,
    }
    for bad in ("x.pt", f"x.pt={a[:-1]}", f"={a}", "x.pt=" + "g" * 64):
        with pytest.raises(CheckpointError, match=SHA256_ENV):
            pinned_sha256s({SHA256_ENV: bad})


def test_a_mirrored_official_checkpoint_keeps_its_official_identity(dev_server, tmp_path, monkeypatch):
    """Through the mirror, the file is verified by the pin and reported under its official URL (what it
    is); without a pin it is first-seen and recorded, as from the official host; a truncated download
    is not available, and leaves nothing behind."""
    data = b"weights" * 5000
    server = dev_server(images={"releases/v1/model.pth": data, "releases/v1/other.pth": data})
    official = "https://example.org/releases/v1/model.pth"
    spec = CheckpointSpec("Test model", "model.pth", official, None)
    monkeypatch.setenv(BASE_URL_ENV, server.url + "/images")
    monkeypatch.setenv(SHA256_ENV, f"model.pth={sha256(data)}")
    resolved = resolve_checkpoint("", spec, cache_dir=tmp_path / "a")
    assert (resolved.source, resolved.status, resolved.sha256) == (official, VERIFIED, sha256(data))
    assert server.paths("/images/") == ["/images/releases/v1/model.pth"]

    monkeypatch.setenv(SHA256_ENV, f"model.pth={'0' * 64}")  # the pin wins over what is served
    with pytest.raises(ChecksumMismatch, match="0" * 64):
        resolve_checkpoint("", spec, cache_dir=tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []

    monkeypatch.delenv(SHA256_ENV)
    other = CheckpointSpec("Other", "other.pth", "https://example.org/releases/v1/other.pth", None)
    assert resolve_checkpoint("", other, cache_dir=tmp_path / "c").status == FIRST_SEEN

    server.inject("/images/releases/v1/model.pth", [Fault(truncate_to=100)])
    with pytest.raises(CheckpointNotFound, match="127.0.0.1"):
        resolve_checkpoint("", spec, cache_dir=tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []
