"""The label assets in Dagster: pseudo_labels per shard, autosam2_manifest, label_quality."""

from __future__ import annotations

import json

import cv2
import numpy as np
import yaml
from dagster import AssetKey, DagsterInstance, materialize
from label_helpers import SHARDS, H, W, seed_shard, write_provenance  # noqa: F401

from assets.pseudo_labels import (
    CHECK_CLASS_KEPT,
    CHECK_COVERAGE,
    CHECK_EMPTY,
    CHECK_LINEAGE,
    CHECK_NO_EMPTY_MASKS,
    CHECK_RLE,
)
from dagster_project.definitions import defs
from pseudolabel import layout
from pseudolabel.dataset.publish import current_root, split_key
from pseudolabel.labels.candidates import read_candidates
from pseudolabel.labels.coco import load_coco
from pseudolabel.labels.relabel import REJECT_REASONS, pseudo_labels_table
from pseudolabel.labels.thresholds import (
    THRESHOLDS_ENV,
    PickPolicy,
    load_thresholds,
    thresholds_code_version,
)
from pseudolabel.storage import LocalObjectStore, read_parquet, write_parquet
from pseudolabel.testing.labels import encode_mask
from pseudolabel.testing.models import FakeDetector
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import LocalModelWorkers


def chain(*names: str) -> list:
    """The code location's asset definitions: code versions stamped from the thresholds file in use."""
    built = defs()
    return [built.get_assets_def(name) for name in names]


def code_version() -> str:
    return chain("pseudo_labels")[0].code_versions_by_key[AssetKey("pseudo_labels")]


def instance_with_shards() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", SHARDS)
    return instance


def materialize_shard(instance, storage_resource, shard, **config):
    return materialize(
        chain("pseudo_labels"),
        partition_key=shard,
        instance=instance,
        resources={"storage": storage_resource, "thresholds": ThresholdsResource()},
        run_config={"ops": {"pseudo_labels": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def test_pseudo_labels_then_manifest_end_to_end(tmp_path):
    # Local backend only: the S3 storage resource is exercised by the storage tests, and the
    # dataset writer runs on both backends in test_autosam2.py.
    store = LocalObjectStore(tmp_path / "store")
    storage_resource = LocalStorageResource(root=str(tmp_path / "store"))
    for n, shard in enumerate(SHARDS):
        seed_shard(store, shard, images=30, seed=n)
    instance = instance_with_shards()
    thresholds = load_thresholds()

    for shard in SHARDS:
        result = materialize_shard(instance, storage_resource, shard, write_polygons=True)
        assert result.success
        (event,) = result.get_asset_materialization_events()
        assert event.step_materialization_data.materialization.partition == shard
        metadata = {
            k: v.value for k, v in result.asset_materializations_for_node("pseudo_labels")[0].metadata.items()
        }
        assert (
            metadata["kept"] + sum(metadata[f"rejected_{r}"] for r in REJECT_REASONS)
            == metadata["candidates"]
        )
        assert metadata["thresholds"] == thresholds.to_dict()
        assert metadata["thresholds_fingerprint"] in thresholds_code_version(thresholds)
        assert "box_score kept" in metadata["score_histograms"]
        assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
            "rles_decode": True,
            "coco_loads": True,
            CHECK_EMPTY: True,
            CHECK_COVERAGE: True,
            CHECK_NO_EMPTY_MASKS: True,
            CHECK_CLASS_KEPT: True,
            CHECK_LINEAGE: True,
        }

        kept = read_parquet(store, layout.pseudo_labels(shard)).to_pandas()
        assert len(kept) == metadata["kept"] > 0
        coco = load_coco(store.get_bytes(layout.pseudo_labels_coco(shard)))
        assert len(coco.imgs) == 30 and len(coco.anns) == len(kept)
        assert coco.dataset["info"]["thresholds_fingerprint"] == metadata["thresholds_fingerprint"]
        polygons = json.loads(store.get_bytes(layout.pseudo_labels_polygons(shard)))
        assert all(isinstance(a["segmentation"], list) for a in polygons["annotations"])

    # The asset's code version is the thresholds' fingerprint, and runs record it.
    assert code_version() == thresholds_code_version(thresholds)
    record = instance.get_latest_materialization_event(AssetKey("pseudo_labels"))
    assert record.dagster_event.step_materialization_data.materialization.tags["dagster/code_version"] == (
        thresholds_code_version(thresholds)
    )

    result = materialize(
        chain("pseudo_labels", "autosam2_manifest"),
        selection=["autosam2_manifest"],
        instance=instance,
        resources={"storage": storage_resource, "thresholds": ThresholdsResource()},
    )
    assert result.success
    metadata = {
        k: v.value for k, v in result.asset_materializations_for_node("autosam2_manifest")[0].metadata.items()
    }
    root = current_root(store)
    splits = {s: store.get_text(split_key(root, s)).split() for s in ("train", "val", "test")}
    labelled = set()
    for shard in SHARDS:
        labelled |= set(read_parquet(store, layout.pseudo_labels(shard)).to_pandas()["image_id"])
    assert sorted(sum(splits.values(), [])) == sorted(labelled)  # empty images skipped by default
    assert metadata["samples"] == len(labelled) and metadata["shards"] == 2
    assert metadata["matches_current_thresholds"] is True
    assert metadata["thresholds_fingerprints"] == [
        metadata_fp := thresholds_code_version(thresholds).split("-")[-1]
    ]
    sample_id = splits["train"][0]
    sample = cv2.imdecode(
        np.frombuffer(store.get_bytes(f"{root}/samples/{sample_id}.jpg"), np.uint8), cv2.IMREAD_COLOR
    )
    assert sample.shape == (512, 512, 3)
    line = json.loads(store.get_text(f"{root}/manifest.jsonl").splitlines()[0])
    assert line["thresholds_fingerprint"] == metadata_fp and line["url"].startswith("https://example.com/")


def test_shards_stored_without_query_index_still_label(tmp_path):
    # Detections written before query_index existed: the asset reads them (the optional column only
    # when stored) and both_scores_agree falls back to the stored detector-score order.
    store = LocalObjectStore(tmp_path / "store")
    seed_shard(store, SHARDS[0], images=30, seed=0)
    seed_shard(store, SHARDS[1], images=30, seed=0)
    old = read_parquet(store, layout.detections(SHARDS[1])).to_pandas().drop(columns="query_index")
    write_parquet(store, layout.detections(SHARDS[1]), old)
    new_detections = read_candidates(store, SHARDS[0]).detections
    old_detections = read_candidates(store, SHARDS[1]).detections
    assert "query_index" in new_detections and "query_index" not in old_detections
    instance = instance_with_shards()
    resource = LocalStorageResource(root=str(tmp_path / "store"))
    labels = []
    for shard in SHARDS:
        assert materialize_shard(instance, resource, shard).success
        labels.append(read_parquet(store, layout.pseudo_labels(shard)).to_pandas())
    if load_thresholds().pick_policy is PickPolicy.BOTH_SCORES_AGREE:
        # Same candidates, scanned in query order vs score order: the top detector box is not always kept.
        assert len(labels[0]) == len(labels[1])
        assert (labels[0]["candidate_id"].to_numpy() != labels[1]["candidate_id"].to_numpy()).any()


def test_editing_the_thresholds_file_changes_the_code_version(tmp_path, monkeypatch):
    original = code_version()
    edited = load_thresholds().to_dict() | {"mask_score": 0.55}
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(edited))
    monkeypatch.setenv(THRESHOLDS_ENV, str(path))
    # The resource reads the file when a step runs; the definitions stamp its fingerprint when they load.
    assert ThresholdsResource().load().mask_score == 0.55
    changed = code_version()
    assert changed != original and changed == thresholds_code_version(load_thresholds(path))
    # Formatting-only edits do not re-label anything.
    path.write_text("# same values, new comment\n" + yaml.safe_dump(edited, sort_keys=True))
    assert code_version() == changed
    monkeypatch.delenv(THRESHOLDS_ENV)
    assert code_version() == original


def test_a_thresholds_edit_marks_materialised_shards_stale(tmp_path, monkeypatch):
    # Dagster's own staleness resolver (what the UI's "unsynced" and "Materialize unsynced" use).
    from dagster._utils.test.data_versions import get_stale_status_resolver

    store = LocalObjectStore(tmp_path / "store")
    seed_shard(store, SHARDS[0], images=5, seed=1)
    instance = instance_with_shards()
    resource = LocalStorageResource(root=str(tmp_path / "store"))
    assert materialize_shard(instance, resource, SHARDS[0]).success

    def status():
        return get_stale_status_resolver(instance, chain("pseudo_labels")).get_status(
            AssetKey("pseudo_labels"), SHARDS[0]
        )

    assert status().value == "FRESH"
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(load_thresholds().to_dict() | {"box_score": 0.5}))
    monkeypatch.setenv(THRESHOLDS_ENV, str(path))
    assert status().value == "STALE"


def test_corrupt_masks_fail_the_blocking_rle_check(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    seed_shard(store, SHARDS[0], images=10, seed=3)
    masks = read_parquet(store, layout.masks(SHARDS[0])).to_pandas()
    masks["mask_area"] = masks["mask_area"] + 1  # stored area disagrees with the RLE
    write_parquet(store, layout.masks(SHARDS[0]), masks)
    result = materialize_shard(
        instance_with_shards(), LocalStorageResource(root=str(tmp_path / "store")), SHARDS[0]
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks[CHECK_RLE].passed is False
    assert "mask_area says" in checks[CHECK_RLE].metadata["examples"].value
    assert not result.success  # blocking: the step fails so nothing downstream consumes the shard


def test_an_empty_kept_mask_fails_the_blocking_check(tmp_path):
    """Thresholds that allow a zero-area mask (min_mask_area_fraction 0) cannot slip one into the labels."""
    store = LocalObjectStore(tmp_path / "store")
    seed_shard(store, SHARDS[0], images=6, seed=5)
    detections = read_parquet(store, layout.detections(SHARDS[0])).to_pandas()
    masks = read_parquet(store, layout.masks(SHARDS[0])).to_pandas()
    first = (detections["image_id"] == detections["image_id"].iloc[0]) & (detections["candidate_id"] == 0)
    detections.loc[first, ["box_score", "text_score"]] = 0.99
    row = (masks["image_id"] == detections["image_id"].iloc[0]) & (masks["candidate_id"] == 0)
    masks.loc[row, ["rle_counts", "mask_area", "mask_score"]] = [
        encode_mask(np.zeros((H, W), np.uint8))["counts"],
        0,
        0.99,
    ]
    write_parquet(store, layout.detections(SHARDS[0]), detections)
    write_parquet(store, layout.masks(SHARDS[0]), masks)
    loose = tmp_path / "loose.yaml"
    loose.write_text(
        yaml.safe_dump(load_thresholds().to_dict() | {"min_mask_area_fraction": 0.0, "pick_policy": "all"})
    )
    result = materialize(
        chain("pseudo_labels"),
        partition_key=SHARDS[0],
        instance=instance_with_shards(),
        resources={
            "storage": LocalStorageResource(root=str(tmp_path / "store")),
            "thresholds": ThresholdsResource(path=str(loose)),
        },
        raise_on_error=False,
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks[CHECK_NO_EMPTY_MASKS].passed is False
    assert checks[CHECK_NO_EMPTY_MASKS].metadata["empty_masks"].value == 1
    assert not result.success


def test_check_bounds_are_configurable(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    seed_shard(store, SHARDS[0], images=10, seed=4)
    resource = LocalStorageResource(root=str(tmp_path / "store"))
    result = materialize_shard(
        instance_with_shards(),
        resource,
        SHARDS[0],
        max_mean_mask_fraction=0.0001,
        min_empty_image_rate=0.99,
        min_class_kept_fraction=0.99,
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks[CHECK_COVERAGE] is False and checks[CHECK_EMPTY] is False
    assert checks[CHECK_CLASS_KEPT] is False
    assert result.success  # warnings only


def test_manifest_refuses_mixed_thresholds(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    resource = LocalStorageResource(root=str(tmp_path / "store"))
    instance = instance_with_shards()
    for n, shard in enumerate(SHARDS):
        seed_shard(store, shard, images=8, seed=n)
        assert materialize_shard(instance, resource, shard).success
    table = read_parquet(store, layout.pseudo_labels(SHARDS[1]))
    stale = table.replace_schema_metadata({b"pseudolabel.thresholds_fingerprint": b"old"}).to_pandas()
    stale["thresholds_fingerprint"] = "old"
    write_parquet(store, layout.pseudo_labels(SHARDS[1]), pseudo_labels_table(stale, "old"))
    run = lambda **config: materialize(  # noqa: E731
        chain("pseudo_labels", "autosam2_manifest"),
        selection=["autosam2_manifest"],
        instance=instance,
        resources={"storage": resource, "thresholds": ThresholdsResource()},
        raise_on_error=False,
        run_config={"ops": {"autosam2_manifest": {"config": {"width": 64, "height": 64, **config}}}},
    )
    failed = run()
    assert not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "Not published: one_thresholds_version: 2 thresholds version(s)" in failure.description
    assert failure.metadata["one_thresholds_version"].data["shards_by_fingerprint"] == {
        "old": [SHARDS[1]],
        thresholds_code_version(load_thresholds()).split("-")[-1]: [SHARDS[0]],
    }
    # The gate shows as a failed blocking check, and nothing was published.
    checks = {e.check_name: e.passed for e in failed.get_asset_check_evaluations()}
    assert checks == {
        "labels_match_candidates": True,
        "provenance_complete": True,
        "one_thresholds_version": False,
        "reviewed_precision": True,
    }
    assert current_root(store) is None
    assert run(allow_mixed_thresholds=True).success
    assert current_root(store) is not None


def test_label_quality_runs_the_chains_models_and_settings_in_a_worker(tmp_path):
    gold = tmp_path / "gold"
    (gold / "images").mkdir(parents=True)
    (gold / "masks").mkdir()
    for stem in ("g1", "g2"):
        cv2.imwrite(str(gold / "images" / f"{stem}.jpg"), np.full((40, 60, 3), 90, np.uint8))
        mask = np.zeros((40, 60), np.uint8)
        mask[10:30, 10:40] = 255
        cv2.imwrite(str(gold / "masks" / f"{stem}.png"), mask)
    detection = {
        "prompt": "thing . leaf .",
        "one_prompt_per_class": True,
        "box_floor": 0.0,
        "text_floor": 0.0,
    }
    result = materialize(
        chain("label_quality"),
        resources={
            "storage": LocalStorageResource(root=str(tmp_path / "store")),
            "detector": DetectorResource(backend="fake", max_boxes_per_caption=4),
            "segmenter": SegmenterResource(backend="fake"),
            # The chain's stage settings: the same resource detections and masks read.
            "stage_settings": StageSettingsResource(**detection, multimask=True),
            "model_workers": LocalModelWorkers(),
            "thresholds": ThresholdsResource(),
        },
        run_config={
            "ops": {
                "label_quality": {
                    "config": {
                        "gold_source": "folder",
                        "gold_dir": str(gold),
                        "box_score_grid": [0.0, 0.99],
                        "mask_score_grid": [0.5],
                        "contour_factor": 0.0,
                    }
                }
            }
        },
    )
    assert result.success
    metadata = {
        k: v.value for k, v in result.asset_materializations_for_node("label_quality")[0].metadata.items()
    }
    assert metadata["gold_images"] == 2
    assert metadata["detection_settings"]["prompt"] == "thing . leaf ."
    assert metadata["mask_settings"] == {"multimask": True}
    assert metadata["detector"]["model"] == "fake_detector" and metadata["detector"]["smoke_run"] is True
    assert metadata["plot_preview"].startswith("![sweep](data:image/png;base64,")

    # The worker ran the chain's stage code: the candidates are what the fake models give the same images.
    store = LocalObjectStore(tmp_path / "store")
    stored = [info.key for info in store.list("label_quality/") if "/gold/" in info.key]
    prepared = [FakeDetector().prepare(key.rsplit("/", 1)[1], store.get_bytes(key)) for key in stored]
    found = FakeDetector(max_boxes_per_caption=4).detect(
        prepared, ["thing .", "leaf ."], box_floor=0.0, text_floor=0.0
    )
    assert metadata["candidates"] == sum(len(f) for f in found) > 0
    masks_key = next(
        info.key for info in store.list("label_quality/") if info.key.endswith("candidates/masks.parquet")
    )
    assert {len(s) for s in read_parquet(store, masks_key).column("multimask_scores").to_pylist()} == {3}
    report = json.loads((tmp_path / "store" / metadata["report"].split("/store/", 1)[1]).read_text())
    assert report["detections"]["prompt"] == "thing . leaf ." and report["masks"] == {"multimask": True}
    by_box = {row["box_score"]: row["mean_iou"] for row in report["sweep"] if row["policy"] == "all"}
    assert by_box[0.99] <= by_box[0.0] and 0.0 < by_box[0.0] <= 1.0


def test_labels_made_from_replaced_masks_block_the_publish_until_relabelled(tmp_path):
    """Lineage: pseudo_labels records the candidates it read; re-running masks with another segmenter and
    not relabelling makes those labels stale, the dataset refuses them naming the shard, a relabel fixes it,
    and the manifest then credits the new segmenter."""
    store = LocalObjectStore(tmp_path / "store")
    resource = LocalStorageResource(root=str(tmp_path / "store"))
    instance = instance_with_shards()
    for n, shard in enumerate(SHARDS):
        seed_shard(store, shard, images=8, seed=n)
        assert materialize_shard(instance, resource, shard).success
    publish = lambda: materialize(  # noqa: E731
        chain("pseudo_labels", "autosam2_manifest"),
        selection=["autosam2_manifest"],
        instance=instance,
        resources={"storage": resource, "thresholds": ThresholdsResource()},
        raise_on_error=False,
        run_config={"ops": {"autosam2_manifest": {"config": {"width": 32, "height": 32}}}},
    )
    assert publish().success
    first = current_root(store)
    manifest = [json.loads(line) for line in store.get_text(f"{first}/manifest.jsonl").splitlines()]
    assert {m["segmenter_model"] for m in manifest} == {"fake/blobs"}

    # masks re-run on shard 1 with another segmenter variant; pseudo_labels not re-run.
    store.put_json(
        layout.provenance(layout.masks(SHARDS[1])),
        {"backend": "fake", "model": "fake", "variant": "other", "fingerprint": "another-segmenter"},
    )
    stale = publish()
    assert not stale.success
    failure = stale.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "labels_match_candidates: 1 stale shard(s)" in failure.description
    assert failure.metadata["labels_match_candidates"].data["stale_shards"] == {
        SHARDS[1]: "masks changed after the labels were made"
    }
    assert current_root(store) == first  # nothing published

    assert materialize_shard(instance, resource, SHARDS[1]).success  # the relabel (no model runs)
    assert publish().success
    manifest = [
        json.loads(line) for line in store.get_text(f"{current_root(store)}/manifest.jsonl").splitlines()
    ]
    by_shard = {m["shard"]: m["segmenter_model"] for m in manifest}
    assert by_shard == {SHARDS[0]: "fake/blobs", SHARDS[1]: "fake/other"}
