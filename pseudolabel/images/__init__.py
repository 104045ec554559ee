"""Catalog images -> upright, RGB, EXIF-preserving JPEGs (the ``normalized_images`` stage).

Modules, leaf first: :mod:`errors` (why an image is quarantined), :mod:`color` (any mode -> sRGB RGB),
:mod:`normalize` (bytes -> upright JPEG),
:mod:`download` (async HTTP), :mod:`index` (a shard's items, index rows, progress and counters),
:mod:`shard` (one shard end to end); contact sheets for asset metadata are in :mod:`pseudolabel.preview`.
"""
