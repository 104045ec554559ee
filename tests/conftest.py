"""Shared fixtures: real storage backends (local dir, S3 served by moto on 127.0.0.1) and a DevServer.

def test_x(store): ...               # runs twice: local and s3 (a plain ObjectStore)
def test_y(storage_resource, store): ...  # a Dagster StorageResource + a store on the same location
def test_z(dev_server): server = dev_server(catalog=[...], images={...})
"""

from __future__ import annotations

import importlib.util
import os

# Failing steps in tests must fail now, not after Dagster's spaced-out step retries (tests that check
# the retry policies read them from the asset definitions). Set before any asset module is imported.
os.environ["PSEUDOLABEL_STEP_RETRIES"] = "0"
# Image URLs resolving to loopback are refused in production; the tests' HTTP servers live there.
os.environ["PSEUDOLABEL_ALLOWED_IMAGE_NETWORKS"] = "127.0.0.0/8"

import pwd  # noqa: E402
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pseudolabel.storage import LocalObjectStore, ObjectStore, S3ObjectStore
from pseudolabel.testing.label_studio import LabelStudioServer, ensure_label_studio_python, start_label_studio
from pseudolabel.testing.servers import DevServer
from pseudolabel.workers.environment import PYTHON_ENV, ensure_worker_python, python_env_var
from resources.storage import LocalStorageResource, S3StorageResource, StorageResource

# tests/worker/ and tests/worker_sam3/ run on model-worker interpreters (see test_worker_suite.py and
# test_sam3_suite.py), not here.
collect_ignore = ["worker", "worker_sam3"]

# Tests sharing an expensive session fixture run in one pytest-xdist worker (`--dist loadgroup`), so
# each fixture starts once per run: a real Label Studio, the demo, the PostgreSQL server.
XDIST_GROUPS = {"label_studio": "label_studio", "demo_run": "demo", "postgres_server": "postgres"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in XDIST_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


# moto accepts any credentials; explicit ones keep boto3 away from the developer's ~/.aws.
_MOTO_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of an S3 API (moto) on 127.0.0.1, random free port, shared by the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test (tests never see each other's objects)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, **_MOTO_CREDENTIALS).create_bucket(Bucket=name)
    return name


S3_PREFIX = "pseudolabel"  # production stores live under a prefix, so tests do too


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def storage_resource(backend: str, request: pytest.FixtureRequest, tmp_path) -> StorageResource:
    """A Dagster storage resource on each backend (what ``materialize(..., resources=...)`` takes)."""
    if backend == "local":
        return LocalStorageResource(root=str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3StorageResource(bucket=bucket, prefix=S3_PREFIX, endpoint_url=endpoint, **_MOTO_CREDENTIALS)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path) -> ObjectStore:
    """An ObjectStore on each backend, built without Dagster: every test using it runs twice.

    Same location as ``storage_resource`` when a test uses both (same tmp dir / bucket / prefix).
    """
    if backend == "local":
        return LocalObjectStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3ObjectStore(boto3.client("s3", endpoint_url=endpoint, **_MOTO_CREDENTIALS), bucket, S3_PREFIX)


@pytest.fixture
def dev_server() -> Iterator[Callable[..., DevServer]]:
    """Factory: ``dev_server(catalog=..., images=..., **options)`` -> a started DevServer, closed after."""
    started: list[DevServer] = []

    def start(*args: Any, **kwargs: Any) -> DevServer:
        server = DevServer(*args, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, worker_python: str):
    """`pseudolabel demo --random-weights` once per session: a persistent instance + data for UI tests."""
    from dagster_project.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo"), images=24, shard_size=8, random_weights=True)


@pytest.fixture(scope="session")
def worker_python() -> str:
    """The model-worker interpreter (torch, sam2, groundingdino + pytest), built on first use exactly as
    `pseudolabel workers install` builds it; every model worker started by later tests uses it."""
    python = ensure_worker_python(extras=("worker", "worker-test"), log=lambda line: print(line, flush=True))
    os.environ[PYTHON_ENV] = python
    return python


@pytest.fixture(scope="session")
def sam3_worker_python() -> str:
    """The SAM 3 worker interpreter (the worker-sam3 extra: torch, transformers >= 5, + pytest), built on
    first use exactly as `pseudolabel workers install --extra worker-sam3 --extra worker-test` builds it, in
    the same cache; every SAM 3 worker started by later tests uses it ($PSEUDOLABEL_WORKER_PYTHON_SAM3)."""
    extras = ("worker-sam3", "worker-test")
    python = ensure_worker_python(extras=extras, log=lambda line: print(line, flush=True))
    os.environ[python_env_var(extras[0])] = python
    return python


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio 1.23.2 on 127.0.0.1 for the whole session (url, personal access token, legacy
    token, python). Its virtualenv is built on first use and cached like the worker environments; a
    failed build (no network) fails the tests that use it. ``document_root`` is a folder tests write
    images into: local-files storages go on sub-folders of it."""
    python = ensure_label_studio_python(log=lambda line: print(line, flush=True))
    root = tmp_path_factory.mktemp("label-studio")
    with start_label_studio(python, root / "data", root / "files") as server:
        yield server


# -- PostgreSQL: the Dagster instance storage the Helm values use ---------------------------------------


class PostgresServer:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust auth, user ``postgres``).

    Nothing here imports psycopg2: its wheel bundles its own OpenSSL, and loading that into the pytest
    process made a later ``ssl.create_default_context`` abort the whole run. Only the Dagster processes
    (code server, daemon, runs) load it; databases are made with the server's own ``createdb``."""

    def __init__(self, host: str, port: int, user: str, bindir: Path):
        self.host, self.port, self.user, self.bindir = host, port, user, bindir

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its name."""
        command = [
            str(self.bindir / "createdb"),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self.user,
            name,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr[-2000:]}")
        return name

    def instance_storage(self, database: str) -> dict[str, Any]:
        """The ``storage:`` block of a dagster.yaml on ``database``, shaped as the Helm chart renders it.

        ``scheme`` names the driver dagster-postgres installs (psycopg2): SQLAlchemy 2.1 maps a bare
        ``postgresql://`` to psycopg 3, which is not installed, and the instance would not load.
        """
        return {
            "postgres": {
                "postgres_db": {
                    "username": self.user,
                    "hostname": self.host,
                    "port": self.port,
                    "db_name": database,
                    "params": {},
                    "scheme": "postgresql+psycopg2",
                }
            }
        }


def _postgres_binaries() -> Path | None:
    def version(initdb: Path) -> list[int]:
        return [int(part) for part in initdb.parts[-3].split(".") if part.isdigit()]

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Debian's PostgreSQL server (``initdb`` / ``pg_ctl`` from /usr/lib/postgresql/*/bin), started once
    per session on a free port of 127.0.0.1; ``create_database`` gives each test its own database.
    Skips, saying why, where the server binaries or the client driver are missing (.ci/run installs both).
    """
    bindir = _postgres_binaries()
    if bindir is None:
        pytest.skip(
            "PostgreSQL SERVER NOT INSTALLED: no /usr/lib/postgresql/*/bin/initdb; install Debian's "
            "`postgresql` package (.ci/run does) to run the tests on Postgres instance storage"
        )
    if importlib.util.find_spec("psycopg2") is None:  # found, not imported (see PostgresServer)
        pytest.skip("dagster-postgres / psycopg2 not installed: `pip install -e '.[dev]'`")
    # The server refuses to run as root: run it as `postgres`, in a directory that user can reach
    # (pytest's tmp dirs live under a 0700 directory of the current user).
    as_postgres: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pseudolabel-postgres-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("PostgreSQL binaries found but no `postgres` user to run the server as (root)")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"

    def pg(*args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*as_postgres, *args], capture_output=True, text=True, timeout=timeout, cwd=root
        )
        if done.returncode != 0:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-3000:]}\n{server_log}")

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        yield PostgresServer("127.0.0.1", port, "postgres", bindir)
    finally:
        try:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
