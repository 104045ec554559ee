"""`pseudolabel demo` runs the whole chain offline and leaves a dataset and an instance behind."""

import json

from dagster import AssetKey, DagsterInstance

from dagster_project.cli import build_parser
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
    assert args.random_weights and args.images == 10 and args.out == "/tmp/x"
