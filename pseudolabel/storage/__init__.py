"""Object storage: one interface, a local-filesystem and an S3 backend."""

from pseudolabel.storage.base import ObjectInfo, ObjectNotFound, ObjectStore
from pseudolabel.storage.local import LocalObjectStore
from pseudolabel.storage.parquet import read_parquet, write_parquet
from pseudolabel.storage.s3 import S3ObjectStore, parse_s3_uri

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "parse_s3_uri",
    "read_parquet",
    "write_parquet",
]
