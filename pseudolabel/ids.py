"""Stable identifiers derived from content, never from position."""

from __future__ import annotations

import hashlib

IMAGE_ID_HEX_CHARS = 16  # 64 bits: ~6e-6 chance of any collision among 15M URLs


def image_id_for_url(url: str) -> str:
    """A stable, filename-safe id for an image URL (same URL -> same id, across runs and machines)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:IMAGE_ID_HEX_CHARS]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
