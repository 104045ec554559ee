"""Catalog videos -> upright JPEG frames and a per-shard frame index (the ``video_frames`` stage).

Which catalog items are videos is decided by URL in :mod:`pseudolabel.media`. Modules, leaf first:
:mod:`decode` (a video file -> sampled upright frames; PyAV, streamed), :mod:`frames` (stored frames:
keys, index rows, the frame-prefix listing, counters, preview), :mod:`shard` (one shard end to end:
download or list, decode, store, index). :mod:`tracking` turns the stored frames into tracks.
"""
