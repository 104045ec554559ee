"""Where every asset reads and writes: a local directory by default, S3 in production.

``PSEUDOLABEL_STORAGE`` picks the backend: a path, or ``s3://bucket/prefix`` (credentials and
``AWS_ENDPOINT_URL`` come from the environment, as boto3 reads them).
"""

import os

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from pseudolabel.storage import LocalObjectStore, ObjectStore, S3ObjectStore, parse_s3_uri

STORAGE_ENV = "PSEUDOLABEL_STORAGE"
DEFAULT_STORAGE_ROOT = "./pseudolabel-data"


class StorageResource(ConfigurableResource):
    """Base class: assets depend on ``storage: StorageResource`` and call :meth:`store`."""

    def store(self) -> ObjectStore:
        raise NotImplementedError

    def location(self) -> str:
        """Where the store lives, as a model worker opens it (``pseudolabel.storage.open_store``)."""
        return self.store().uri()

    def worker_env(self) -> dict[str, str]:
        """Environment a model worker needs to reach the store. The launcher decides what it passes on:
        a local subprocess gets all of it; a pod gets no credentials (it has Kubernetes secrets)."""
        return {}


class LocalStorageResource(StorageResource):
    """Objects under a local directory (atomic temp-file + rename writes)."""

    root: str = DEFAULT_STORAGE_ROOT

    def store(self) -> ObjectStore:
        return LocalObjectStore(self.root)


class S3StorageResource(StorageResource):
    """Objects under ``s3://bucket/prefix``; the client comes from dagster-aws's ``S3Resource``, built
    on first use (dagster-aws costs ~0.9 s to import: not paid by every process loading the code location).
    Unset fields fall back to boto3's environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, credentials)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    profile_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    max_attempts: int = 5
    _store: ObjectStore | None = PrivateAttr(default=None)

    def store(self) -> ObjectStore:
        if self._store is None:
            from dagster_aws.s3 import S3Resource

            client = S3Resource(
                endpoint_url=self.endpoint_url,
                region_name=self.region_name,
                profile_name=self.profile_name,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                aws_session_token=self.aws_session_token,
                max_attempts=self.max_attempts,
            ).get_client()
            self._store = S3ObjectStore(client, self.bucket, self.prefix)
        return self._store

    def worker_env(self) -> dict[str, str]:
        settings = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region_name,
            "AWS_PROFILE": self.profile_name,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_SESSION_TOKEN": self.aws_session_token,
        }
        return {name: str(value) for name, value in settings.items() if value}


def storage_from_env(environ: dict[str, str] | None = None) -> StorageResource:
    """Build the storage resource that ``PSEUDOLABEL_STORAGE`` describes."""
    environ = os.environ if environ is None else environ
    root = environ.get(STORAGE_ENV, "").strip() or DEFAULT_STORAGE_ROOT
    if root.startswith("s3://"):
        bucket, prefix = parse_s3_uri(root)
        endpoint = environ.get("AWS_ENDPOINT_URL") or None
        return S3StorageResource(bucket=bucket, prefix=prefix, endpoint_url=endpoint)
    return LocalStorageResource(root=root)
