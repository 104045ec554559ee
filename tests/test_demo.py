"""`pseudolabel demo` runs the whole chain offline and leaves a dataset and an instance behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from dagster_project.cli import build_parser
from dagster_project.demo import DemoNeedsGpu, check_runnable
from pseudolabel.storage import LocalObjectStore

CHAIN = [
    "catalog_snapshot",
    "stratified_sample",
    "normalized_images",
    "detections",
    "masks",
    "pseudo_labels",
    "autosam2_manifest",
]


def test_demo_ends_at_an_autosam2_dataset(demo_run):
    assert demo_run.shards == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]  # 26 items / 8
    assert demo_run.counts["normalized_images.images_ok"] == 24  # 24 pictures + 2 broken on purpose
    assert demo_run.counts["normalized_images.images_quarantined"] == 2
    assert demo_run.counts["masks.candidates"] == demo_run.counts["detections.candidates"]
    store = LocalObjectStore(demo_run.data_root)
    current = store.get_json("autosam2/CURRENT.json")
    root = current["root"]
    ids = [
        line
        for split in ("train", "val", "test")
        for line in store.get_text(f"{root}/splits/{split}.txt").split()
    ]
    assert len(ids) == demo_run.counts["autosam2_manifest.samples"] == 24
    for sample_id in ids:
        assert store.exists(f"{root}/samples/{sample_id}.jpg")
        assert store.exists(f"{root}/binary_masks/{sample_id}_binarymask.jpg")
    manifest = [json.loads(line) for line in store.get_text(f"{root}/manifest.jsonl").splitlines()]
    assert {m["id"] for m in manifest} == set(ids)
    # Provenance from what the workers really ran (tiny random-weight models: no checkpoint digest).
    for line in manifest:
        assert line["detector_backend"] == "grounding_dino" and line["segmenter_backend"] == "sam2"
        assert line["detector_model"] == "grounding_dino/swint_ogc-tiny"
        assert line["segmenter_model"] == "sam2.1/tiny-tiny"
        assert len(line["detector_fingerprint"]) == len(line["segmenter_fingerprint"]) == 64
        assert line["detector_checkpoint_sha256"] is None  # random weights have none
    assert "SMOKE RUN" in demo_run.render()


def test_demo_instance_records_every_asset(demo_run):
    instance = DagsterInstance.from_config(str(demo_run.dagster_home))
    for name in CHAIN:
        assert instance.get_latest_materialization_event(AssetKey(name)) is not None, name
    assert sorted(instance.get_materialized_partitions(AssetKey("masks"))) == demo_run.shards


def test_cli_parses_demo_flags():
    args = build_parser().parse_args(["demo", "--random-weights", "--images", "10", "--out", "/tmp/x"])
    assert args.random_weights and args.images == 10 and args.out == "/tmp/x" and args.device == "auto"


def test_the_official_demo_without_a_gpu_says_so_before_any_download(tmp_path):
    """`pseudolabel demo` (official checkpoints) on this GPU-less machine: refused at once, before the
    worker environment or a checkpoint is touched, with the ways forward."""
    cache = tmp_path / "model-cache"
    env = {
        **os.environ,
        "PSEUDOLABEL_MODEL_CACHE": str(cache),
        "PSEUDOLABEL_WORKER_HOME": str(tmp_path / "workers"),
        "PATH": os.environ["PATH"],
    }
    env.pop("PSEUDOLABEL_GPUS", None)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pseudolabel")), "demo", "--out", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "needs a CUDA GPU" in done.stderr
        and "--random-weights" in done.stderr
        and "--device cpu" in done.stderr
    )
    assert not cache.exists() and not (tmp_path / "workers").exists()  # nothing downloaded or built
    assert not (tmp_path / "demo" / "data").exists()


def test_check_runnable_allows_a_chosen_device_or_a_gpu():
    check_runnable("official", "cpu", [])
    check_runnable("official", "auto", ["0"])
    check_runnable("random", "auto", [])
    with pytest.raises(DemoNeedsGpu):
        check_runnable("official", "auto", [])
