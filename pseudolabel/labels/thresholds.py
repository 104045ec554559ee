"""Label thresholds: one versioned YAML file, parsed strictly and fingerprinted.

The fingerprint is a hash of the *parsed, normalised* values, so reformatting or commenting the
file changes nothing, while any value change gives a new fingerprint. The ``pseudo_labels`` asset
uses it as its Dagster ``code_version``, which is what makes a threshold edit show up as
"unsynced" in the UI.

Per-class overrides (the optional ``classes`` section) replace the per-candidate filter thresholds
for one detector phrase; NMS, the instance cap and the pick policy stay global. A file without
``classes`` fingerprints exactly as before the section existed, so stored labels stay in sync.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
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

# The per-candidate filter thresholds, which a ``classes`` entry may override for one phrase.
# Unit-interval values; nms_iou is one too but acts across candidates, so it stays global.
CLASS_KEYS = ("box_score", "text_score", "mask_score", "min_mask_area_fraction", "max_box_coverage")
UNIT_KEYS = (*CLASS_KEYS, "nms_iou")

# Normalised per-class overrides: sorted by class, each class's (key, value) pairs sorted by key.
ClassOverrides = tuple[tuple[str, tuple[tuple[str, float], ...]], ...]


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
    # Per-class overrides of CLASS_KEYS, keyed by the detector's phrase. Accepts a mapping
    # ``{phrase: {key: value}}`` (or the normalised tuple form) and stores it as ClassOverrides,
    # so the dataclass stays frozen and hashable.
    classes: ClassOverrides = ()

    def __post_init__(self) -> None:
        # Normalise types here so Thresholds(...) built in code fingerprints like the parsed YAML.
        for name in UNIT_KEYS:
            object.__setattr__(self, name, _unit_float(name, getattr(self, name)))
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
        object.__setattr__(self, "classes", _normalise_classes(self.classes))

    @property
    def class_overrides(self) -> dict[str, dict[str, float]]:
        """The ``classes`` section as plain nested dicts (phrase -> key -> value)."""
        return {name: dict(pairs) for name, pairs in self.classes}

    def for_class(self, name: str) -> Thresholds:
        """The thresholds one class's candidates are filtered with: the global values with that
        class's overrides applied, and no ``classes`` section (an unlisted class gets the globals)."""
        return replace(self, classes=(), **self.class_overrides.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for metadata, COCO ``info`` and the fingerprint).

        ``classes`` appears only when non-empty, so thresholds without overrides give the same dict
        (and fingerprint) as before per-class overrides existed."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "classes"}
        data["pick_policy"] = self.pick_policy.value
        if self.classes:
            data["classes"] = self.class_overrides
        return data

    def with_overrides(self, **changes: Any) -> Thresholds:
        return replace(self, **changes)

    def with_class_overrides(self, name: str, **changes: float) -> Thresholds:
        """A copy where class ``name`` additionally overrides ``changes`` (other classes untouched)."""
        classes = self.class_overrides
        classes[name] = {**classes.get(name, {}), **changes}
        return replace(self, classes=classes)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ThresholdsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ThresholdsError(f"{name} must be finite, got {value}")
    return value


def _unit_float(name: str, value: Any) -> float:
    value = _as_float(name, value)
    if not 0.0 <= value <= 1.0:
        raise ThresholdsError(f"{name} must be in [0, 1], got {value}")
    return value


def _normalise_classes(classes: Any) -> ClassOverrides:
    """Validate per-class overrides and bring them to the sorted, hashable ClassOverrides form.

    ``None`` (a ``classes:`` key with nothing under it) and classes with no keys mean no overrides.
    Unknown keys and keys that must stay global are errors naming the class and the key.
    """
    if classes is None:
        return ()
    if isinstance(classes, tuple):  # already normalised (e.g. dataclasses.replace), or pairs
        classes = {name: dict(pairs) for name, pairs in classes}
    if not isinstance(classes, Mapping):
        raise ThresholdsError(
            f"classes must be a mapping of class -> overrides, got {type(classes).__name__}"
        )
    normalised = []
    for name, overrides in classes.items():
        if not isinstance(name, str) or not name:
            raise ThresholdsError(f"classes: class names must be non-empty strings, got {name!r}")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, Mapping):
            raise ThresholdsError(
                f"classes.{name} must be a mapping of threshold -> value, got {type(overrides).__name__}"
            )
        unknown = sorted(str(key) for key in set(overrides) - set(CLASS_KEYS))
        if unknown:
            global_keys = sorted(set(unknown) & set(FIELD_NAMES))
            hint = f" ({', '.join(global_keys)} can only be set globally)" if global_keys else ""
            raise ThresholdsError(
                f"classes.{name}: unknown keys {unknown}{hint}; per-class keys are {list(CLASS_KEYS)}"
            )
        pairs = tuple(
            (key, _unit_float(f"classes.{name}.{key}", overrides[key])) for key in sorted(overrides)
        )
        if pairs:
            normalised.append((name, pairs))
    return tuple(sorted(normalised))


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ThresholdsError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ThresholdsError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


FIELD_NAMES = tuple(f.name for f in fields(Thresholds))
# Every key but ``classes`` is required in a thresholds file.
REQUIRED_FIELD_NAMES = tuple(name for name in FIELD_NAMES if name != "classes")


def thresholds_from_mapping(data: Any) -> Thresholds:
    """Build thresholds from parsed YAML; every key but ``classes`` is required and unknown keys
    (top-level or inside a class) are errors.

    Strictness is deliberate: a typo'd key silently falling back to a default would re-label
    100k images with thresholds nobody chose.
    """
    if not isinstance(data, dict):
        raise ThresholdsError(f"thresholds must be a mapping, got {type(data).__name__}")
    missing = sorted(set(REQUIRED_FIELD_NAMES) - set(data))
    unknown = sorted(str(key) for key in set(data) - set(FIELD_NAMES))
    if missing or unknown:
        raise ThresholdsError(f"thresholds keys: missing {missing}, unknown {unknown}")
    return Thresholds(**{name: data[name] for name in FIELD_NAMES if name in data})


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
