"""Shared fixtures: real storage backends (local dir, S3 served by moto on 127.0.0.1) and a DevServer.

def test_x(store): ...               # runs twice: local and s3 (a plain ObjectStore)
def test_y(storage_resource, store): ...  # a Dagster StorageResource + a store on the same location
def test_z(dev_server): server = dev_server(catalog=[...], images={...})
"""

from __future__ import annotations

import os

# Failing steps in tests must fail now, not after Dagster's spaced-out step retries (tests that check
# the retry policies read them from the asset definitions). Set before any asset module is imported.
os.environ["PSEUDOLABEL_STEP_RETRIES"] = "0"

import uuid  # noqa: E402
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pseudolabel.devserver import DevServer
from pseudolabel.storage import LocalObjectStore, ObjectStore, S3ObjectStore
from pseudolabel.workers.environment import PYTHON_ENV, ensure_worker_python
from resources.storage import LocalStorageResource, S3StorageResource, StorageResource

# tests/worker/ runs on the model-worker interpreter (see test_worker_suite.py), not here.
collect_ignore = ["worker"]

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
