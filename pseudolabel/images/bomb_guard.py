"""Pillow's decompression-bomb guard with a chosen pixel limit, warnings escalated to errors.

Pillow reads both the limit (``Image.MAX_IMAGE_PIXELS``) and the warnings filter from process
globals, so they cannot be set per image from worker threads without racing each other. Enter
this once around a whole batch, from the thread that owns the worker pool; workers then see it.
:func:`pseudolabel.images.normalize.normalize_image` also checks the header size itself, so a
call outside the guard still honours its own ``max_pixels``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image


@contextmanager
def decompression_bomb_guard(max_pixels: int) -> Iterator[None]:
    """Within the block: more than ``max_pixels`` pixels raises instead of decoding."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow only *warns* between 1x and 2x the limit; for untrusted input that is a bomb too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous
