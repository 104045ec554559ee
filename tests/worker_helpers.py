"""Running the GPU assets through model workers in tests: shards of synthetic images, a materialization
with fake models by default, and each shard's latest metadata read back from the instance."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from dagster import AssetKey, DagsterInstance, materialize
from images import write_image_shard

from pseudolabel import layout
from pseudolabel.storage import LocalObjectStore
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers

RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def shards(store: LocalObjectStore, count: int, images: int = 4) -> list[str]:
    names = [layout.shard_name(i) for i in range(count)]
    for i, name in enumerate(names):
        write_image_shard(store, name, [(96, 64)] * images, seed=i)
    return names


def run(
    store,
    assets,
    instance,
    *,
    detector=None,
    segmenter=None,
    workers=None,
    shard=None,
    tags=None,
    settings=None,
):
    return materialize(
        assets,
        partition_key=shard,
        instance=instance,
        tags=tags,
        raise_on_error=False,
        resources={
            "storage": LocalStorageResource(root=str(store.root)),
            "detector": detector or DetectorResource(backend="fake"),
            "segmenter": segmenter or SegmenterResource(backend="fake"),
            "stage_settings": StageSettingsResource(**(settings or {})),
            "model_workers": workers or LocalModelWorkers(),
        },
    )


def shard_metadata(instance: DagsterInstance, asset: str) -> dict[str, dict]:
    records = instance.fetch_materializations(AssetKey(asset), limit=100).records
    latest: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        m = record.asset_materialization
        latest[m.partition] = {k: v.value for k, v in m.metadata.items()}
    return latest


def run_worker_suite(python: str, folder: str, min_passed: int) -> None:
    """``pytest tests/<folder>`` on a worker interpreter (its own pytest.ini); passes only when it does, with
    at least ``min_passed`` tests and nothing skipped or erroring."""
    from pseudolabel.workers.environment import source_path_entry

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source_path_entry(), str(tests)])}
    ini = str(tests / folder / "pytest.ini")
    result = subprocess.run(
        [python, "-m", "pytest", "-c", ini, str(tests / folder), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= min_passed, summary
    assert "skipped" not in summary and "error" not in summary, summary
