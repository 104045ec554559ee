"""`pseudolabel demo`: the whole chain, offline, on a synthetic catalog served over real HTTP.

It starts a local catalog/image server, materializes every asset with local storage into a
persistent Dagster instance under ``--out`` (so `dagster dev` can show the runs afterwards), and
prints what was produced and where.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, materialize

from assets.common import SHARDS_PARTITIONS_NAME
from dagster_project.definitions import defs
from dagster_project.jobs import SHARD_CHAIN
from pseudolabel.images.download import ALLOWED_NETWORKS_ENV
from pseudolabel.testing.catalogs import demo_items
from pseudolabel.testing.servers import DevServer
from pseudolabel.workers.environment import ensure_worker_python
from resources.catalog import CatalogResource
from resources.models import StageSettingsResource, TrackerResource, model_resources
from resources.storage import LocalStorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import LocalModelWorkers, visible_gpus

DEMO_NETWORK = "127.0.0.0/8"  # where the demo's catalog/image server listens
INSTANCE_YAML = """\
concurrency:
  pools:
    default_limit: 1
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 60
telemetry:
  enabled: false
"""


@dataclass
class DemoSummary:
    out_dir: Path
    data_root: Path
    dagster_home: Path
    models: str
    shards: list[str]
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    dataset_root: str = ""

    def render(self) -> str:
        smoke = (
            "  (SMOKE RUN: random weights, labels say nothing about quality)"
            if self.models != "official"
            else ""
        )
        lines = [
            f"pseudolabel demo finished in {self.seconds:.1f}s - models: {self.models}{smoke}",
            *(f"  {name:<34} {value:>8,}" for name, value in self.counts.items()),
            f"  shards: {', '.join(self.shards)}",
            f"  data:            {self.data_root}",
            f"  AutoSAM2 dataset: {self.dataset_root}",
            f"  Dagster instance: {self.dagster_home}",
            "",
            "See it in the UI:",
            f"  DAGSTER_HOME={self.dagster_home} PSEUDOLABEL_STORAGE={self.data_root} "
            f"PSEUDOLABEL_MODELS={self.models} {ALLOWED_NETWORKS_ENV}={DEMO_NETWORK} dagster dev -w workspace.yaml",
        ]
        return "\n".join(lines)


def demo_instance(dagster_home: Path) -> DagsterInstance:
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_YAML)
    return DagsterInstance.from_config(str(dagster_home))


class DemoNeedsGpu(RuntimeError):
    """The official checkpoints were asked for on a machine without a CUDA GPU: said before any download."""


def check_runnable(models: str, device: str, gpus: list[str]) -> None:
    """Refuse, up front, the official demo on a machine without a visible CUDA GPU unless a device was
    chosen: otherwise ~1.2 GB of checkpoints would download and only then the worker would refuse the CPU."""
    if models == "official" and device == "auto" and not gpus:
        raise DemoNeedsGpu(
            "the official demo needs a CUDA GPU and this machine shows none (nvidia-smi -L finds no GPU, "
            "PSEUDOLABEL_GPUS unset). Run `pseudolabel demo --random-weights` for an offline smoke run, or "
            "`pseudolabel demo --device cpu` to run the official checkpoints on the CPU (downloads ~1.2 GB; "
            "minutes per image)."
        )


def run_demo(
    out_dir: Path,
    images: int = 48,
    shard_size: int = 16,
    random_weights: bool = False,
    models: str | None = None,
    device: str = "auto",
) -> DemoSummary:
    """Run catalog -> sample -> images -> detections -> masks -> pseudo-labels -> AutoSAM2 dataset."""
    models = models or ("random" if random_weights else "official")
    check_runnable(models, device, visible_gpus())
    started = time.perf_counter()
    data_root, dagster_home = out_dir / "data", out_dir / "dagster_home"
    instance = demo_instance(dagster_home)
    items = demo_items(images)
    detector, segmenter = model_resources(models)
    if device != "auto":
        detector = detector.model_copy(update={"device": device})
        segmenter = segmenter.model_copy(update={"device": device})
    if models != "fake":  # build the model-worker environment up front, with pip's progress shown
        ensure_worker_python(log=lambda line: print(line, flush=True))
    with loopback_images_allowed():
        tracker = TrackerResource(models=models, device=None if device == "auto" else device)
        shards, result = _run_chain(instance, items, detector, segmenter, tracker, data_root, shard_size)

    summary = DemoSummary(out_dir, data_root, dagster_home, models, shards, time.perf_counter() - started)
    summary.counts = _counts(instance, shards)
    meta = result.asset_materializations_for_node("autosam2_manifest")[0].metadata
    summary.counts["autosam2_manifest.samples"] = int(meta["samples"].value)
    summary.dataset_root = (
        str(meta["dataset_root"].value) if "dataset_root" in meta else str(data_root / "autosam2")
    )
    return summary


@contextmanager
def loopback_images_allowed() -> Iterator[None]:
    """The demo's image server is on loopback, which production refuses to fetch from: allow it while
    the demo runs, and only then."""
    previous = os.environ.get(ALLOWED_NETWORKS_ENV)
    os.environ[ALLOWED_NETWORKS_ENV] = DEMO_NETWORK
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOWED_NETWORKS_ENV, None)
        else:
            os.environ[ALLOWED_NETWORKS_ENV] = previous


def _run_chain(instance, items, detector, segmenter, tracker, data_root: Path, shard_size: int):
    """Serve the synthetic catalog and materialize every stage; returns (shards, dataset run result)."""
    # The code location's own asset definitions (code versions included), run with the demo's resources.
    chain = defs().get_assets_def
    catalog: list[dict] = []  # filled once the server knows its port; served through the callable
    images_by_name = {item.name: item.data for item in items if item.data is not None}
    page = lambda offset, limit: catalog[offset : offset + limit]  # noqa: E731
    with DevServer(page, images=images_by_name, total=len(items)) as server:
        catalog.extend(
            {"id": f"demo-{i:05d}", "image_url": server.image_url(it.name), "label": it.label}
            for i, it in enumerate(items)
        )
        resources = {
            "storage": LocalStorageResource(root=str(data_root)),
            "catalog": CatalogResource(source=server.catalog_url, page_size=16),
            "detector": detector,
            "segmenter": segmenter,
            "tracker": tracker,
            "stage_settings": StageSettingsResource(),
            "thresholds": ThresholdsResource(),
            "model_workers": LocalModelWorkers(),
        }
        # Sample every item (URLs carry the server's random port, so a partial sample would vary).
        sample_config = {"sample_size": len(items), "min_per_stratum": 2, "shard_size": shard_size}
        _check(
            materialize(
                [chain("catalog_snapshot"), chain("stratified_sample")],
                resources=resources,
                instance=instance,
                run_config={"ops": {"stratified_sample": {"config": sample_config}}},
            )
        )
        shards = sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
        for shard in shards:
            _check(
                materialize(
                    [chain(name) for name in SHARD_CHAIN],
                    partition_key=shard,
                    resources=resources,
                    instance=instance,
                    # The broken demo items are there to show quarantine, not to fail a small shard.
                    run_config={"ops": {"normalized_images": {"config": {"max_failure_rate": 0.5}}}},
                )
            )
        # Random weights rarely clear the thresholds; a smoke run still shows the dataset layout.
        dataset_config = {"include_empty": tracker.models != "official"}
        result = _check(
            materialize(
                [chain("autosam2_manifest")],
                resources=resources,
                instance=instance,
                run_config={"ops": {"autosam2_manifest": {"config": dataset_config}}},
            )
        )
    return shards, result


def _check(result):
    if not result.success:
        raise RuntimeError("demo step failed; see the Dagster logs above")
    return result


def _counts(instance: DagsterInstance, shards: list[str]) -> dict[str, int]:
    """Totals over the shards' latest materializations, read back from the instance."""
    wanted = {
        "normalized_images": ["images_ok", "images_quarantined"],
        "detections": ["candidates", "zero_candidate_images"],
        "masks": ["candidates"],
        "pseudo_labels": ["kept", "images_labelled"],
    }
    counts: dict[str, int] = {}
    for asset_name, keys in wanted.items():
        for shard in shards:
            metadata = _latest_metadata(instance, asset_name, shard)
            for key in keys:
                if key in metadata:
                    counts[f"{asset_name}.{key}"] = counts.get(f"{asset_name}.{key}", 0) + int(
                        metadata[key].value
                    )
    return counts


def _latest_metadata(instance: DagsterInstance, asset_name: str, shard: str) -> dict:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset_name), asset_partitions=[shard]), limit=1
    ).records
    return dict(records[0].asset_materialization.metadata) if records else {}
