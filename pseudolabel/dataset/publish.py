"""Write the AutoSAM2 training set as a new version, then flip a pointer to it.

Layout (every version is a complete AutoSAM2 dataset root)::

    autosam2/CURRENT.json                                   pointer: {"version", "root", ...} (written last)
    autosam2/versions/<version>/samples/<id>.jpg            resized image
    autosam2/versions/<version>/binary_masks/<id>_binarymask.jpg
    autosam2/versions/<version>/manifest.jsonl              one line per sample
    autosam2/versions/<version>/coco.json                   merged COCO (original resolution)
    autosam2/versions/<version>/splits/{test,val,train}.txt one id per line (written after all else)

Atomicity: a version directory is never modified after ``CURRENT.json`` names it, and the pointer is
replaced in one atomic PUT, so a trainer that resolves ``CURRENT.json`` once reads one complete
dataset. Inside a version, splits are written last, so even a reader that lists versions directly
never sees a split naming a sample that is not there yet. The previous ``keep_versions - 1``
versions are kept for trainers still reading them; older ones are deleted after the flip.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pseudolabel import layout
from pseudolabel.dataset.samples import (
    DEFAULT_FRACTIONS,
    SPLITS,
    SampleSpec,
    assign_splits,
    render_image,
    render_mask,
)
from pseudolabel.labels.coco import build_coco, category_names, coco_to_bytes
from pseudolabel.storage import ObjectNotFound, ObjectStore

CURRENT_KEY = layout.AUTOSAM2_CURRENT
MAX_REPORTED_FAILURES = 20
_PROGRESS_EVERY = 2000

# Paths live in pseudolabel/layout.py; these names are what the dataset code reads best with.
version_root = layout.autosam2_version_root
sample_key = layout.autosam2_sample
mask_key = layout.autosam2_binary_mask
split_key = layout.autosam2_split


def read_current(store: ObjectStore) -> dict[str, Any] | None:
    try:
        return store.get_json(CURRENT_KEY)
    except ObjectNotFound:
        return None


def current_root(store: ObjectStore) -> str | None:
    """Storage key of the dataset root a trainer should read (``store.uri(...)`` for a path)."""
    current = read_current(store)
    return current["root"] if current else None


@dataclass(frozen=True)
class PublishSummary:
    version: str
    root: str
    samples: int
    split_sizes: dict[str, int]
    reused_samples: int
    failures: int
    failure_examples: list[str] = field(default_factory=list)
    deleted_versions: list[str] = field(default_factory=list)


def _previous_samples(store: ObjectStore, spec: SampleSpec) -> tuple[str | None, dict[str, str]]:
    """Root of the current version and its {id: source sha256}, when its samples can be reused."""
    current = read_current(store)
    if not current or current.get("sample_spec") != asdict(spec):
        return None, {}
    try:
        lines = store.get_text(f"{current['root']}/manifest.jsonl").splitlines()
    except ObjectNotFound:
        return None, {}
    rows = (json.loads(line) for line in lines if line)
    return current["root"], {r["id"]: r["source_sha256"] for r in rows if r.get("source_sha256")}


def _render_one(
    store: ObjectStore,
    root: str,
    spec: SampleSpec,
    sample: Mapping[str, Any],
    counts: list[str],
    previous_root: str | None,
    previous_sha: dict[str, str],
) -> tuple[str, bool, str | None]:
    """Write one sample + mask; returns (id, reused, error)."""
    image_id, shard = sample["image_id"], sample["shard"]
    height, width = int(sample["height"]), int(sample["width"])
    reused = False
    try:
        sha = sample.get("source_sha256")
        if previous_root and sha and previous_sha.get(image_id) == sha:
            # Same source bytes and same spec: the resized sample is identical, copy it.
            image_bytes = store.get_bytes(sample_key(previous_root, image_id))
            reused = True
        else:
            image_bytes = render_image(store.get_bytes(source_key(sample)), spec, (height, width))
        mask_bytes = render_mask(counts, height, width, spec)
    except (ObjectNotFound, ValueError) as exc:  # RenderError, or an RLE pycocotools refuses
        return image_id, False, f"{shard}/{image_id}: {exc}"
    store.put_bytes(sample_key(root, image_id), image_bytes)
    store.put_bytes(mask_key(root, image_id), mask_bytes)
    return image_id, reused, None


def source_key(sample: Mapping[str, Any]) -> str:
    """Where a sample's source picture is stored: ``source_key`` when the sample has one (a video
    frame), else the shard's normalised image."""
    key = sample.get("source_key")
    return key if isinstance(key, str) and key else layout.image(sample["shard"], sample["image_id"])


def _manifest_line(sample: Mapping[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        return value.item() if isinstance(value, np.generic) else value

    row = {
        "id": sample["image_id"],
        "url": sample["url"],
        "label": sample["label"],
        "shard": sample["shard"],
        "split": sample["split"],
        "thresholds_fingerprint": sample["thresholds_fingerprint"],
        **{
            f"{stage}_{field}": sample[f"{stage}_{field}"]
            for stage in ("detector", "segmenter")
            for field in ("model", "backend", "checkpoint_sha256", "fingerprint")
        },
        "instance_count": sample["instance_count"],
        "mask_fraction": round(float(sample["mask_fraction"]), 6),
        "width": sample["width"],
        "height": sample["height"],
        "source_sha256": sample["source_sha256"],
        "verified": bool(sample.get("verified", False)),  # a reviewer's masks, not the chain's
        "source_key": source_key(sample),
    }
    return json.dumps({k: clean(v) for k, v in row.items()}, sort_keys=False)


def merged_coco(samples: pd.DataFrame, instances: pd.DataFrame, info: dict[str, Any]) -> dict[str, Any]:
    """One COCO file for the whole set, at original resolution (``file_name`` = source image key,
    ``sample_file`` = the resized sample in this version)."""
    images = samples.assign(
        file_name=[source_key(sample) for sample in samples.to_dict("records")],
        sample_file=[f"samples/{i}.jpg" for i in samples["image_id"]],
    )
    return build_coco(
        instances,
        images,
        categories=category_names(instances["phrase"]) if len(instances) else [],
        info=info,
        image_fields=("sample_file", "split", "label", "shard", "verified"),
    )


def publish_dataset(
    store: ObjectStore,
    samples: pd.DataFrame,
    instances: pd.DataFrame,
    *,
    version: str,
    spec: SampleSpec | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    workers: int = 2,
    keep_versions: int = 2,
    info: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> PublishSummary:
    """Render ``samples`` (rows of :data:`~pseudolabel.dataset.collect.SAMPLE_COLUMNS`) with their
    ``instances`` into a new version, then point ``CURRENT.json`` at it (see module docstring).

    Samples whose source image is missing or misaligned are skipped and reported, not fatal.
    """
    spec = spec or SampleSpec()
    if keep_versions < 1:
        raise ValueError("keep_versions must be >= 1")
    if samples.empty:
        raise ValueError("no samples to publish (no labelled images in any shard?)")
    root = version_root(version)
    if any(True for _ in store.list(root + "/")):
        raise ValueError(f"version {version} already exists in {store.uri(root)}")
    previous_root, previous_sha = _previous_samples(store, spec)
    counts_by_image = (
        instances.groupby("image_id")["rle_counts"].agg(list).to_dict() if len(instances) else {}
    )
    records = samples.to_dict("records")

    failures: list[str] = []
    reused = 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # cv2 and IO release the GIL
            results = pool.map(
                lambda s: _render_one(
                    store, root, spec, s, counts_by_image.get(s["image_id"], []), previous_root, previous_sha
                ),
                records,
            )
            ok_ids = set()
            for done, (image_id, was_reused, error) in enumerate(results, start=1):
                if error is None:
                    ok_ids.add(image_id)
                    reused += was_reused
                else:
                    failures.append(error)
                if done % _PROGRESS_EVERY == 0 or done == len(records):
                    log(f"rendered {done}/{len(records)} samples ({reused} reused, {len(failures)} failed)")
        written = samples.loc[samples["image_id"].isin(ok_ids)].reset_index(drop=True)
        if written.empty:
            raise ValueError(f"every sample failed to render, e.g. {failures[:3]}")
        written["split"] = assign_splits(written["image_id"], written["label"].tolist(), fractions, seed)
        kept_instances = instances.loc[instances["image_id"].isin(ok_ids)] if len(instances) else instances
        store.put_text(
            f"{root}/manifest.jsonl", "\n".join(map(_manifest_line, written.to_dict("records"))) + "\n"
        )
        store.put_bytes(
            f"{root}/coco.json", coco_to_bytes(merged_coco(written, kept_instances, dict(info or {})))
        )
        split_sizes = {}
        for split in SPLITS:  # last inside the version: a split never names a missing file
            ids = written.loc[written["split"] == split, "image_id"].tolist()
            store.put_text(split_key(root, split), "".join(f"{i}\n" for i in ids))
            split_sizes[split] = len(ids)
    except BaseException:
        store.delete_prefix(root + "/")  # never leave a half-written version behind
        raise

    deleted = _flip_pointer(store, version, root, spec, split_sizes, keep_versions, info or {})
    return PublishSummary(
        version=version,
        root=root,
        samples=len(written),
        split_sizes=split_sizes,
        reused_samples=reused,
        failures=len(failures),
        failure_examples=failures[:MAX_REPORTED_FAILURES],
        deleted_versions=deleted,
    )


def _flip_pointer(
    store: ObjectStore,
    version: str,
    root: str,
    spec: SampleSpec,
    split_sizes: dict[str, int],
    keep_versions: int,
    info: Mapping[str, Any],
) -> list[str]:
    previous = read_current(store)
    history = [{"version": version, "root": root}]
    if previous:
        history += [h for h in previous.get("history", []) if h["version"] != version]
    store.put_json(
        CURRENT_KEY,
        {
            "version": version,
            "root": root,
            "created_at": datetime.now(UTC).isoformat(),
            "sample_spec": asdict(spec),
            "split_sizes": split_sizes,
            "info": dict(info),
            "history": history[:keep_versions],
        },
    )
    deleted = []
    for old in history[keep_versions:]:  # only after the flip: no reader is sent there any more
        store.delete_prefix(old["root"] + "/")
        deleted.append(old["version"])
    return deleted
