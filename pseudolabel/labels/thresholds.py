"""Label thresholds: one versioned YAML file, parsed strictly and fingerprinted.

The fingerprint is a hash of the *parsed, normalised* values, so reformatting or commenting the
file changes nothing, while any value change gives a new fingerprint. The ``pseudo_labels`` asset
uses it as its Dagster ``code_version``, which is what makes a threshold edit show up as
"unsynced" in the UI.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from pseudolabel.fingerprint import fingerprint

THRESHOLDS_ENV = "PSEUDOLABEL_THRESHOLDS"
DEFAULT_THRESHOLDS_PATH = Path(__file__).with_name("thresholds.yaml")

# Bump when the *meaning* of the same thresholds changes (e.g. a new filter order in relabel.py),
# so that stored labels are re-made even though the YAML did not change.
LABEL_ALGORITHM_VERSION = 1

FINGERPRINT_HEX_CHARS = 16


class PickPolicy(StrEnum):
    ALL = "all"  # every instance that survives filters and NMS (capped per image)
    BEST_MASK_SCORE = "best_mask_score"  # one per image: highest SAM2 score
    BOTH_SCORES_AGREE = "both_scores_agree"  # one per image: the seed pipeline's rule, see picking.py


class ThresholdsError(ValueError):
    """The thresholds file is missing a key, has an unknown key or an out-of-range value."""


@dataclass(frozen=True)
class Thresholds:
    version: int
    box_score: float
    text_score: float
    mask_score: float
    min_mask_area_fraction: float
    max_box_coverage: float
    nms_iou: float
    max_instances_per_image: int
    pick_policy: PickPolicy

    def __post_init__(self) -> None:
        # Normalise types here so Thresholds(...) built in code fingerprints like the parsed YAML.
        for name in (
            "box_score",
            "text_score",
            "mask_score",
            "min_mask_area_fraction",
            "max_box_coverage",
            "nms_iou",
        ):
            value = _as_float(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ThresholdsError(f"{name} must be in [0, 1], got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "version", _as_int("version", self.version, minimum=1))
        object.__setattr__(
            self,
            "max_instances_per_image",
            _as_int("max_instances_per_image", self.max_instances_per_image, 1),
        )
        try:
            object.__setattr__(self, "pick_policy", PickPolicy(str(self.pick_policy).strip().lower()))
        except ValueError as exc:
            choices = ", ".join(p.value for p in PickPolicy)
            raise ThresholdsError(f"pick_policy must be one of {choices}, got {self.pick_policy!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for metadata, COCO ``info`` and the fingerprint)."""
        data = asdict(self)
        data["pick_policy"] = self.pick_policy.value
        return data

    def with_overrides(self, **changes: Any) -> Thresholds:
        return replace(self, **changes)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ThresholdsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ThresholdsError(f"{name} must be finite, got {value}")
    return value


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ThresholdsError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ThresholdsError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


FIELD_NAMES = tuple(f.name for f in fields(Thresholds))


def thresholds_from_mapping(data: Any) -> Thresholds:
    """Build thresholds from parsed YAML; every key is required and unknown keys are errors.

    Strictness is deliberate: a typo'd key silently falling back to a default would re-label
    100k images with thresholds nobody chose.
    """
    if not isinstance(data, dict):
        raise ThresholdsError(f"thresholds must be a mapping, got {type(data).__name__}")
    missing = sorted(set(FIELD_NAMES) - set(data))
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if missing or unknown:
        raise ThresholdsError(f"thresholds keys: missing {missing}, unknown {unknown}")
    return Thresholds(**{name: data[name] for name in FIELD_NAMES})


def parse_thresholds(text: str) -> Thresholds:
    return thresholds_from_mapping(yaml.safe_load(text))


def thresholds_path(environ: dict[str, str] | None = None) -> Path:
    """The file in use: ``$PSEUDOLABEL_THRESHOLDS`` when set, else the packaged default."""
    environ = os.environ if environ is None else environ
    override = environ.get(THRESHOLDS_ENV, "").strip()
    return Path(override).expanduser() if override else DEFAULT_THRESHOLDS_PATH


def load_thresholds(path: str | os.PathLike[str] | None = None) -> Thresholds:
    path = thresholds_path() if path is None else Path(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ThresholdsError(f"cannot read thresholds file {path}: {exc}") from exc
    try:
        return parse_thresholds(text)
    except (ThresholdsError, yaml.YAMLError) as exc:
        raise ThresholdsError(f"{path}: {exc}") from exc


def thresholds_fingerprint(thresholds: Thresholds) -> str:
    """Stable short hash of the normalised thresholds plus the label algorithm version."""
    payload = {"algorithm": LABEL_ALGORITHM_VERSION, "thresholds": thresholds.to_dict()}
    return fingerprint(payload, length=FINGERPRINT_HEX_CHARS)


def thresholds_code_version(thresholds: Thresholds) -> str:
    """The Dagster code version of ``pseudo_labels``: changes exactly when the labels would."""
    return f"thresholds-v{thresholds.version}-{thresholds_fingerprint(thresholds)}"
