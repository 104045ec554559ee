"""What a model worker is asked to do, and what it reports back: plain JSON, both directions.

The orchestrator sends a :class:`WorkerTask` as Pipes extras. The worker answers with Pipes custom
messages, one dict each, tagged by ``event``:

``models_loaded``  {"models": {"detector"|"segmenter"|"tracker": identity}, "seconds": float}
``shard_started``  {"shard": str}
``shard_done``     {"shard": str, "metadata": {name: {"type": ..., "raw_value": ...}}}
``failed``         {"shard": str | None, "kind": FailureKind, "message": str}

Metadata values use the Pipes metadata format, so Dagster renders markdown previews and paths as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pseudolabel.models.loading import DetectorSpec, SegmenterSpec, TrackerSpec

DETECTIONS = "detections"
MASKS = "masks"
GOLD_CANDIDATES = "gold_candidates"  # label_quality: both models over a gold set, the chain's settings
VIDEO_TRACKS = "video_tracks"  # detector keyframes + tracker over every video of a shard
STAGES = (DETECTIONS, MASKS, GOLD_CANDIDATES, VIDEO_TRACKS)

# Event names of the worker's custom messages.
MODELS_LOADED = "models_loaded"
SHARD_STARTED = "shard_started"
SHARD_DONE = "shard_done"
FAILED = "failed"

# How a worker failure should be treated: "config" and "error" fail once (retrying cannot help);
# "oom" may succeed on a retry with a smaller batch.
FailureKind = Literal["config", "oom", "error"]


@dataclass(frozen=True)
class WorkerTask:
    stage: str  # DETECTIONS | MASKS | GOLD_CANDIDATES | VIDEO_TRACKS
    shards: list[str]  # shard names; for GOLD_CANDIDATES the storage prefix of the evaluation
    storage: str  # a local directory or s3://bucket/prefix (credentials come from the environment)
    # The stage's settings: DetectionSettings / SegmentationSettings fields, or for GOLD_CANDIDATES
    # {"detections": {...}, "masks": {...}}, for VIDEO_TRACKS {"detections": {...}, "tracking": {...}}.
    settings: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] | None = None  # DetectorSpec.to_dict()
    segmenter: dict[str, Any] | None = None  # SegmenterSpec.to_dict()
    tracker: dict[str, Any] | None = None  # TrackerSpec.to_dict()
    # Recompute every shard. By default a shard whose stored output already has this task's fingerprint
    # (same inputs, model and settings) is reused, not recomputed: re-runs and retries redo only the rest.
    force: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; one of {list(STAGES)}")
        if not self.shards:
            raise ValueError("a worker task needs at least one shard")

    def to_extras(self) -> dict[str, Any]:
        return {"task": asdict(self)}

    @classmethod
    def from_extras(cls, extras: dict[str, Any]) -> WorkerTask:
        return cls(**extras["task"])

    def detector_spec(self) -> DetectorSpec | None:
        return DetectorSpec.from_dict(self.detector) if self.detector is not None else None

    def segmenter_spec(self) -> SegmenterSpec | None:
        return SegmenterSpec.from_dict(self.segmenter) if self.segmenter is not None else None

    def tracker_spec(self) -> TrackerSpec | None:
        return TrackerSpec.from_dict(self.tracker) if self.tracker is not None else None

    @property
    def environment(self) -> str | None:
        """The worker environment (pyproject extra) this task runs in; None = no model stack needed.

        One worker runs one environment: a task whose models need two different ones cannot run."""
        specs = [
            s for s in (self.detector_spec(), self.segmenter_spec(), self.tracker_spec()) if s is not None
        ]
        needed = {spec.environment for spec in specs} - {None}
        if len(needed) > 1:
            from pseudolabel.models.loading import ModelConfigError

            names = ", ".join(f"{spec.backend} -> {spec.environment}" for spec in specs if spec.environment)
            raise ModelConfigError(
                f"the {self.stage} stage's models need different worker environments ({names}); "
                "one worker runs one environment"
            )
        return needed.pop() if needed else None

    @property
    def needs_model_stack(self) -> bool:
        """Whether the worker needs torch and the model packages (False for stand-ins and annotation files)."""
        return self.environment is not None


def meta(value: Any, kind: str = "__infer__") -> dict[str, Any]:
    """One metadata entry in the Pipes format: ``kind`` is "md", "path", "json", ... or inferred."""
    return {"type": kind, "raw_value": value}
