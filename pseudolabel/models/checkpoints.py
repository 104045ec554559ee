"""Model checkpoints: resolve a configured source to a verified local file.

A source is one of

    ""  / "official"     the variant's official release URL, downloaded once into the cache
    "https://..."        any other URL, same caching
    "s3://bucket/key"    fetched through the object store into the cache
    "/a/local/file.pth"  used in place
    "random"             no checkpoint: the architecture keeps its random init (smoke runs only)

Every file is checked by sha256. The expected digest comes from the caller (resource config) or
the variant's pinned table; when neither knows it, the digest seen on first download is recorded
next to the cached file (``<file>.sha256``) and every later use must match it (trust on first use,
reported as ``first_seen`` so the operator can pin it). A mismatch is always an error: a cached file
is never silently replaced, because a swapped checkpoint silently changes every label downstream.

Two variables act on the official files (source ``""`` / ``"official"``), for mirrors and tests:
``$PSEUDOLABEL_CHECKPOINT_BASE_URL`` replaces the scheme and host of every official URL (a path in it is
prepended: ``https://mirror.internal/models`` serves ``/models/segment_anything_2/092824/...``), so files
come from a mirror or a local test server; ``$PSEUDOLABEL_CHECKPOINT_SHA256`` (``file=sha256`` pairs,
comma or space separated) pins digests by file name, over the table, e.g. for the SAM2.1 files whose
digests are otherwise recorded on first download. The identity a backend reports keeps the official URL
(what the file is); the digest, checked on every use, says it is that file. A download whose digest
differs is refused and never enters the cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit

from pseudolabel.storage import S3ObjectStore, parse_s3_uri

CACHE_ENV = "PSEUDOLABEL_MODEL_CACHE"
BASE_URL_ENV = "PSEUDOLABEL_CHECKPOINT_BASE_URL"  # scheme + host (+ path prefix) of the official URLs
SHA256_ENV = "PSEUDOLABEL_CHECKPOINT_SHA256"  # "file=sha256,..." pins for the official files
DEFAULT_CACHE_DIR = "~/.cache/pseudolabel"
RANDOM = "random"
OFFICIAL = "official"
_CHUNK = 1 << 20

# How a resolved checkpoint's digest was established.
VERIFIED = "verified"  # matched a pinned or configured sha256
RECORDED = "recorded"  # matched the digest recorded when it was first downloaded
FIRST_SEEN = "first_seen"  # no known digest: computed now and recorded; pin it
UNPINNED = "unpinned"  # a local file with no expected digest: computed, nothing to compare
RANDOM_WEIGHTS = "random"


class CheckpointError(RuntimeError):
    """A checkpoint could not be provided."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint is not available from the configured source."""


class ChecksumMismatch(CheckpointError):
    """The file's sha256 differs from the expected one."""


@dataclass(frozen=True)
class CheckpointSpec:
    """An official checkpoint: file name, release URL and (when known) its sha256."""

    name: str  # human label, e.g. "Grounding DINO swint_ogc"
    filename: str
    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path | None  # None for random weights
    sha256: str | None
    source: str  # the URL, s3 URI, local path or "random" it came from
    status: str  # VERIFIED | RECORDED | FIRST_SEEN | UNPINNED | RANDOM_WEIGHTS

    @property
    def is_random(self) -> bool:
        return self.path is None


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(CACHE_ENV, "").strip() or DEFAULT_CACHE_DIR).expanduser()


def official_url(url: str, environ: Mapping[str, str] | None = None) -> str:
    """``url`` (an official release URL) with its scheme and host replaced by ``$PSEUDOLABEL_CHECKPOINT_BASE_URL``
    when that is set; a path in the base is prepended to the URL's path."""
    environ = os.environ if environ is None else environ
    base = environ.get(BASE_URL_ENV, "").strip()
    if not base:
        return url
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise CheckpointError(
            f"{BASE_URL_ENV}={base!r} is not a base URL: expected http(s)://host[:port][/path prefix]"
        )
    official = urlsplit(url)
    return f"{base.rstrip('/')}{official.path}" + (f"?{official.query}" if official.query else "")


def pinned_sha256s(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """File name -> sha256 from ``$PSEUDOLABEL_CHECKPOINT_SHA256`` (``name=digest`` pairs separated by
    commas or whitespace); a malformed entry is an error, never ignored (it would unpin a file)."""
    environ = os.environ if environ is None else environ
    pins: dict[str, str] = {}
    for entry in environ.get(SHA256_ENV, "").replace(",", " ").split():
        name, _, digest = entry.partition("=")
        digest = digest.strip().lower()
        if not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(
                f"{SHA256_ENV}: {entry!r} is not 'file=sha256' (64 hex digits), e.g. "
                "'sam2.1_hiera_large.pt=<sha256>'"
            )
        pins[name] = digest
    return pins


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(
    source: str,
    spec: CheckpointSpec,
    *,
    expected_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    s3_get: Callable[[str], bytes] | None = None,
    timeout_s: float = 60.0,
) -> ResolvedCheckpoint:
    """Turn a configured checkpoint ``source`` into a verified local file (see module docstring).

    ``expected_sha256`` (from config) overrides ``spec.sha256``. ``s3_get`` fetches an ``s3://`` URI's
    bytes (default: boto3 through :class:`S3ObjectStore`).
    """
    source = (source or "").strip()
    expected = (expected_sha256 or "").strip().lower() or None
    if source == RANDOM:
        return ResolvedCheckpoint(path=None, sha256=None, source=RANDOM, status=RANDOM_WEIGHTS)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if source in ("", OFFICIAL):
        url = official_url(spec.url)
        pinned = pinned_sha256s().get(spec.filename)
        kind = "configured" if expected else f"${SHA256_ENV}" if pinned else "pinned"
        return _resolve_remote(
            spec.url,
            cache / spec.filename,
            spec,
            expected or pinned or spec.sha256,
            allow_download,
            lambda target: _download_http(url, target, timeout_s),
            fetched_from=url,
            expected_kind=kind,
        )
    if source.startswith(("http://", "https://")):
        target = cache / Path(urlparse(source).path).name
        return _resolve_remote(
            source, target, spec, expected, allow_download, lambda t: _download_http(source, t, timeout_s)
        )
    if source.startswith("s3://"):
        bucket, key = parse_s3_uri(source)
        getter = s3_get or _boto3_s3_get
        return _resolve_remote(
            source,
            cache / "s3" / bucket / key,
            spec,
            expected,
            allow_download,
            lambda t: _write_bytes(getter(source), t),
        )
    return _resolve_local(Path(source).expanduser(), spec, expected)


def _resolve_local(path: Path, spec: CheckpointSpec, expected: str | None) -> ResolvedCheckpoint:
    if not path.is_file():
        raise CheckpointNotFound(
            f"{spec.name} checkpoint not found at local path {path}. Point the resource's `checkpoint` at an "
            f"existing file, use an s3:// URI, leave it empty to download {spec.url}, or use 'random' for a "
            f"smoke run."
        )
    digest = sha256_file(path)
    if expected and digest != expected:
        raise ChecksumMismatch(_mismatch_message(spec, path, expected, digest, "configured"))
    return ResolvedCheckpoint(
        path=path, sha256=digest, source=str(path), status=VERIFIED if expected else UNPINNED
    )


def _resolve_remote(
    source: str,
    target: Path,
    spec: CheckpointSpec,
    expected: str | None,
    allow_download: bool,
    fetch: Callable[[Path], None],
    *,
    fetched_from: str | None = None,
    expected_kind: str = "configured",
) -> ResolvedCheckpoint:
    """The cached ``target`` if present (checked), else ``fetch`` it into a temp file beside it, check
    it, and only then rename it into place. ``source`` is the identity reported; ``fetched_from`` the
    URL actually read (a mirror's, default ``source``); ``expected_kind`` says where ``expected`` came
    from, for the error message."""
    fetched_from = fetched_from or source
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file():
        digest = sha256_file(target)
        if expected:
            if digest != expected:
                raise ChecksumMismatch(_mismatch_message(spec, target, expected, digest, expected_kind))
            return ResolvedCheckpoint(target, digest, source, VERIFIED)
        if sidecar.is_file():
            recorded = sidecar.read_text().split()[0].strip().lower()
            if digest != recorded:
                raise ChecksumMismatch(
                    _mismatch_message(spec, target, recorded, digest, "recorded at first download")
                )
            return ResolvedCheckpoint(target, digest, source, RECORDED)
        sidecar.write_text(f"{digest}  {target.name}\n")
        return ResolvedCheckpoint(target, digest, source, FIRST_SEEN)

    if not allow_download:
        raise CheckpointNotFound(
            _missing_message(spec, fetched_from, target, "downloads are disabled (allow_download=False)")
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Fetch into a temp file beside the target, verify, then rename: a reader never sees a partial file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            fetch(tmp)
        except Exception as exc:  # network, HTTP status, S3 errors: all mean "not available here"
            raise CheckpointNotFound(
                _missing_message(spec, fetched_from, target, f"fetching it failed: {exc!r}")
            ) from exc
        digest = sha256_file(tmp)
        if expected and digest != expected:
            raise ChecksumMismatch(
                _download_mismatch_message(spec, fetched_from, target, expected, digest, expected_kind)
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # a refused or partial download never stays in the cache
    if expected:
        return ResolvedCheckpoint(target, digest, source, VERIFIED)
    sidecar.write_text(f"{digest}  {target.name}\n")
    return ResolvedCheckpoint(target, digest, source, FIRST_SEEN)


def _download_http(url: str, target: Path, timeout_s: float) -> None:
    """``url``'s body into ``target``. A body shorter than its Content-Length is an error: http.client's
    ``read(n)`` returns a dropped connection's partial body as if complete, and an unpinned file's
    digest would then be recorded from the truncated copy."""
    received = 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:
        announced = response.headers.get("Content-Length")
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
    if announced is not None and received != int(announced):
        raise OSError(f"incomplete download: {received} of {announced} bytes")


def _write_bytes(data: bytes, target: Path) -> None:
    target.write_bytes(data)


def _boto3_s3_get(uri: str) -> bytes:
    import boto3  # deferred: only S3 checkpoints need it

    bucket, key = parse_s3_uri(uri)
    return S3ObjectStore(boto3.client("s3"), bucket).get_bytes(key)


def _missing_message(spec: CheckpointSpec, source: str, target: Path, why: str) -> str:
    return (
        f"{spec.name} checkpoint '{target.name}' is not available.\n"
        f"  looked for: {target} (model cache; set {CACHE_ENV} or the resource's cache_dir to change it)\n"
        f"  source:     {source} -> {why}\n"
        f"To provide it: copy the file to {target}; or set the resource's `checkpoint` to a local path or an "
        f"s3:// URI holding it; or run where {source} is reachable. Use checkpoint='random' only for smoke runs."
    )


def _download_mismatch_message(
    spec: CheckpointSpec, url: str, target: Path, expected: str, actual: str, kind: str
) -> str:
    return (
        f"{spec.name} checkpoint '{target.name}' downloaded from {url} has sha256 {actual}, but the {kind} "
        f"sha256 is {expected}. Refused: it was not stored in the cache ({target} is unchanged). The "
        f"download is corrupted or not the expected file; if a mirror serves it ({BASE_URL_ENV}), check "
        f"the mirror's copy."
    )


def _mismatch_message(spec: CheckpointSpec, path: Path, expected: str, actual: str, kind: str) -> str:
    return (
        f"{spec.name} checkpoint {path} has sha256 {actual}, but the {kind} sha256 is {expected}. "
        f"Refusing to use it (a different checkpoint changes every label). If the new file is intended, "
        f"set checkpoint_sha256 to its digest; otherwise delete {path} so it is fetched again."
    )


# ---- Hugging Face model directories (OWLv2, DINOv2, EdgeTAM, SAM 3) ----------------------------------


@dataclass(frozen=True)
class HubModel:
    """An official Hugging Face model: repo id and the revision (commit) it is pinned to."""

    name: str  # human label, e.g. "OWLv2 base-patch16-ensemble"
    repo_id: str
    revision: str = "main"  # pin a commit hash: a moving branch silently changes every label
    gated: bool = False  # needs a token (HF_TOKEN) whose owner accepted the model's licence


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_pretrained_dir(
    source: str,
    model: HubModel,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    s3_list_get: Callable[[str], dict[str, bytes]] | None = None,
) -> ResolvedCheckpoint:
    """Turn a configured ``source`` into a local ``from_pretrained`` directory.

    ``""`` / ``"official"``: ``model.repo_id`` at ``model.revision`` through the Hugging Face hub cache
    (``HF_TOKEN`` for gated models); a local directory; ``s3://bucket/prefix`` = every object under
    the prefix, fetched once into ``<cache>/s3/bucket/prefix``; ``"random"`` = no weights. The digest
    is the sha256 over the weight files' own sha256s (sorted by name), so it identifies the weights.
    """
    source = (source or "").strip()
    if source == RANDOM:
        return ResolvedCheckpoint(path=None, sha256=None, source=RANDOM, status=RANDOM_WEIGHTS)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if source in ("", OFFICIAL):
        origin = f"hf://{model.repo_id}@{model.revision}"
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    model.repo_id,
                    revision=model.revision,
                    local_files_only=not allow_download,
                    token=os.environ.get("HF_TOKEN") or None,
                )
            )
        except Exception as exc:  # offline, gated without a token, unknown revision
            gated = (
                " It is gated: accept its licence on the hub and set HF_TOKEN in the worker's environment."
                if model.gated
                else ""
            )
            raise CheckpointNotFound(
                f"{model.name} ({origin}) is not available: {exc!r}.{gated} Or set the resource's "
                "`checkpoint` to a local directory or an s3:// prefix holding it; 'random' for smoke runs."
            ) from exc
        return ResolvedCheckpoint(path, _directory_digest(path), origin, VERIFIED)
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_uri(source)
        target = cache / "s3" / bucket / prefix
        if not (target / ".complete").is_file():
            if not allow_download:
                raise CheckpointNotFound(
                    f"{model.name}: {source} is not cached at {target} and downloads are off"
                )
            objects = (s3_list_get or _boto3_s3_prefix)(source)
            if not objects:
                raise CheckpointNotFound(f"{model.name}: nothing under {source}")
            for name, data in objects.items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                _write_bytes(data, target / name)
            (target / ".complete").write_text(source + "\n")
        return ResolvedCheckpoint(target, _directory_digest(target), source, FIRST_SEEN)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointNotFound(
            f"{model.name}: {path} is not a model directory (no config.json). Point `checkpoint` at a "
            f"save_pretrained() directory, an s3:// prefix holding one, or leave it empty for {model.repo_id}."
        )
    return ResolvedCheckpoint(path, _directory_digest(path), str(path), UNPINNED)


def _directory_digest(path: Path) -> str:
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _boto3_s3_prefix(uri: str) -> dict[str, bytes]:
    import boto3  # deferred: only S3 checkpoints need it

    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    store = S3ObjectStore(boto3.client("s3"), bucket)
    return {info.key[len(prefix) :]: store.get_bytes(info.key) for info in store.list(prefix)}
