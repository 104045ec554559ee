"""Markdown for asset metadata in the Dagster UI: small tables and inline images."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd

_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A small GitHub-style Markdown table (Dagster renders these in the asset's metadata)."""

    def fmt(value: object) -> str:
        if isinstance(value, float | np.floating):
            return float_format.format(value)
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def markdown_image(image_bytes: bytes, alt: str) -> str:
    """A Markdown image with the bytes inlined as a data URI (PNG or JPEG, detected)."""
    mime = next((m for magic, m in _MIME.items() if image_bytes.startswith(magic)), "image/png")
    encoded = base64.b64encode(image_bytes).decode("ascii")
    alt = alt.replace("[", "(").replace("]", ")")
    return f"![{alt}](data:{mime};base64,{encoded})"
