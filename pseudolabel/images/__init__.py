"""Catalog images -> upright, RGB, EXIF-preserving JPEGs (the ``normalized_images`` stage).

Modules, leaf first: :mod:`errors` (why an image is quarantined), :mod:`exif`, :mod:`color`,
:mod:`bomb_guard`, :mod:`normalize` (bytes -> JPEG), :mod:`download` (async HTTP),
:mod:`sample_items`, :mod:`index`, :mod:`stats`, :mod:`shard` (one shard end to end) and
:mod:`preview` (contact sheets for asset metadata).
"""
