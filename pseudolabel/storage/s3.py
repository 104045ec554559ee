"""S3 (or S3-compatible) object store over a boto3 client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from pseudolabel.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, clean_key, clean_prefix


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, clean_key(parsed.path)


class S3ObjectStore(ObjectStore):
    """Objects under ``s3://bucket/prefix``. A single PUT is atomic on S3, so no temp keys."""

    def __init__(self, client: Any, bucket: str, prefix: str = ""):
        self.client = client
        self.bucket = bucket
        self.prefix = clean_key(prefix)

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """boto3's managed upload: streamed from the file, multipart above 8 MiB. The object appears
        under ``key`` only when the upload completes; a killed one is aborted by :meth:`remove_stale_temp`."""
        self.client.upload_file(os.fspath(path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise ObjectNotFound(self.uri(key)) from exc
        return response["Body"].read()

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A GET URL for ``key`` that works without credentials for ``expires_s`` seconds (S3 allows at
        most 7 days), e.g. for a labelling tool that shows the image in a reviewer's browser."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires_s)
        )

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _full_prefix(self, prefix: str) -> str:
        relative = clean_prefix(prefix)
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
            for obj in page.get("Contents", []):
                yield ObjectInfo(key=self._relative(obj["Key"]), size=int(obj["Size"]))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = [self._key(info.key) for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def remove_stale_temp(self, prefix: str) -> int:
        """Abort the incomplete multipart uploads under ``prefix``; returns how many were aborted.

        A single PUT (all this store does) is atomic, so S3 has no temp keys; what a killed writer
        can leave is a multipart upload (from tools that stream large objects) that never completed:
        invisible under its key, but its parts are stored and billed until aborted. This store starts
        them only in :meth:`put_file` (big files), which a step finishes before it ends, so any under a
        step's own prefix when it starts belongs to a writer that is gone.
        """
        paginator = self.client.get_paginator("list_multipart_uploads")
        uploads = [
            (upload["Key"], upload["UploadId"])
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix))
            for upload in page.get("Uploads", [])
        ]
        aborted = 0
        for key, upload_id in uploads:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except self.client.exceptions.NoSuchUpload:
                continue  # completed or aborted meanwhile
            aborted += 1
        return aborted

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else f"s3://{self.bucket}/{self.prefix}"
