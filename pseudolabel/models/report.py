"""Plain-value run metadata shared by the GPU stages (the assets wrap it for Dagster)."""

from __future__ import annotations

from typing import Any

SMOKE_RUN_NOTE = (
    "SMOKE RUN: random or fake weights; exercises the code path, says nothing about label quality"
)


def model_metadata(identity: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Flatten a model ``describe()`` into metadata entries, labelling smoke runs loudly."""
    out: dict[str, str | int | float | bool] = {}
    for key in (
        "backend",
        "model",
        "variant",
        "weights",
        "checkpoint",
        "checkpoint_sha256",
        "checkpoint_status",
        "text_encoder",
        "device",
        "precision",
        "batch_size",
        "input_size",
    ):
        value = identity.get(key)
        if value is not None and value != "":
            out[key] = value if isinstance(value, (int, float, bool)) else str(value)
    out["smoke_run"] = bool(identity.get("smoke_run", False))
    if out["smoke_run"]:
        out["smoke_run_note"] = SMOKE_RUN_NOTE
    return out


def throughput(images: int, seconds: float) -> float:
    return round(images / seconds, 3) if seconds > 0 else 0.0
