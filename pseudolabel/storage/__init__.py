"""Object storage: one interface, a local-filesystem and an S3 backend, and Parquet tables through them."""

from pseudolabel.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, read_parquet, write_parquet
from pseudolabel.storage.local import LocalObjectStore
from pseudolabel.storage.s3 import S3ObjectStore, parse_s3_uri


def open_store(location: str) -> ObjectStore:
    """The store at ``location``: a local directory, or ``s3://bucket/prefix`` with a boto3 client
    configured from the environment (credentials, ``AWS_ENDPOINT_URL``, region), as model workers
    and pods receive it."""
    if location.startswith("s3://"):
        import boto3

        bucket, prefix = parse_s3_uri(location)
        return S3ObjectStore(boto3.client("s3"), bucket, prefix)
    return LocalObjectStore(location)


__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "open_store",
    "parse_s3_uri",
    "read_parquet",
    "write_parquet",
]
