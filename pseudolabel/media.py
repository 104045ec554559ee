"""What a catalog URL points at: an image, a video file, or a prefix (folder) of video frames.

Decided from the URL's path alone (no request), case-insensitively, ignoring the query and fragment
(signed URLs keep working):

- a path ending in ``/`` is a **frame prefix**: a folder of one video's frames (how it is listed is
  in :mod:`pseudolabel.video.frames`);
- a path ending in a video extension (:data:`VIDEO_EXTENSIONS`: ``.mp4 .m4v .webm .mov .mkv .avi``)
  is a **video**;
- anything else is an **image**, as every URL was before videos existed.

``normalized_images`` takes the images and skips (and counts) the rest; ``video_frames`` takes the
videos and frame prefixes.
"""

from __future__ import annotations

import posixpath
from enum import StrEnum
from urllib.parse import unquote, urlsplit

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".webm", ".mov", ".mkv", ".avi"})


class MediaKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    FRAME_PREFIX = "frame_prefix"

    @property
    def is_video(self) -> bool:
        """A video file or a frame prefix: ``video_frames`` material, not ``normalized_images``'."""
        return self is not MediaKind.IMAGE


def media_kind(url: str) -> MediaKind:
    """The kind of ``url`` by its path (rules in the module docstring)."""
    path = unquote(urlsplit(url.strip()).path)
    if path.endswith("/"):
        return MediaKind.FRAME_PREFIX
    if posixpath.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return MediaKind.VIDEO
    return MediaKind.IMAGE
