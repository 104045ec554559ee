"""Why an image was quarantined: a small, fixed set of categories plus a free-text detail."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Categories are stable strings: they are counted in metadata and stored in the index."""

    HTTP_ERROR = "http_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    BAD_URL = "bad_url"
    BLOCKED_ADDRESS = "blocked_address"  # resolves to a private/loopback/link-local/reserved address
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT = "corrupt"


class ImageRejected(Exception):
    """This one image cannot be used; the shard goes on without it."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def message(self) -> str:
        """What the index stores in ``error``: ``"<category>: <detail>"``."""
        return f"{self.reason.value}: {self.detail}"
