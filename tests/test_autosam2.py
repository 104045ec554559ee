"""The AutoSAM2 training set: splits, rendering, collecting shards and versioned publishing."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pandas as pd
import pytest

from pseudolabel import layout
from pseudolabel.dataset.collect import collect
from pseudolabel.dataset.publish import (
    CURRENT_KEY,
    current_root,
    mask_key,
    publish_dataset,
    read_current,
    sample_key,
    split_key,
)
from pseudolabel.dataset.samples import (
    RenderError,
    SampleSpec,
    assign_splits,
    binary_mask,
    render_image,
    render_mask,
    split_counts,
)
from pseudolabel.labels.relabel import pseudo_labels_table
from pseudolabel.schemas import PSEUDO_LABELS
from pseudolabel.storage import LocalObjectStore, write_parquet
from pseudolabel.testing.labels import encode_mask

H, W = 48, 64
SPEC = SampleSpec(width=32, height=24)


# --- splits ------------------------------------------------------------------------------------------


def test_split_counts_use_largest_remainder():
    assert split_counts(1000, {"train": 0.95, "val": 0.04, "test": 0.01}) == {
        "train": 950,
        "val": 40,
        "test": 10,
    }
    assert split_counts(10, {"train": 0.95, "val": 0.04, "test": 0.01}) == {"train": 10, "val": 0, "test": 0}
    assert split_counts(99, {"train": 0.95, "val": 0.04, "test": 0.01}) == {"train": 94, "val": 4, "test": 1}
    assert split_counts(0, {"train": 0.95, "val": 0.04, "test": 0.01}) == {"train": 0, "val": 0, "test": 0}


def test_splits_are_stratified_seeded_and_stable():
    ids = [f"id{i:05d}" for i in range(3000)]
    labels = ["cat"] * 2000 + ["dog"] * 900 + ["rare"] * 100
    splits = assign_splits(ids, labels, seed=1)
    per_label = Counter(zip(labels, splits, strict=True))
    assert (per_label["cat", "train"], per_label["cat", "val"], per_label["cat", "test"]) == (1900, 80, 20)
    assert (per_label["dog", "train"], per_label["dog", "val"], per_label["dog", "test"]) == (855, 36, 9)
    assert (per_label["rare", "train"], per_label["rare", "val"], per_label["rare", "test"]) == (95, 4, 1)
    assert assign_splits(ids, labels, seed=1).equals(splits)  # deterministic
    assert (assign_splits(ids, labels, seed=2) != splits).any()  # the seed matters
    # Order of the input does not matter: assignment depends on (seed, id, label set) only.
    shuffled = assign_splits(ids[::-1], labels[::-1], seed=1)
    assert dict(zip(ids[::-1], shuffled, strict=True)) == dict(zip(ids, splits, strict=True))
    # Adding 5 % more samples moves few existing ones.
    grown = assign_splits([*ids, *(f"new{i}" for i in range(150))], [*labels, *["cat"] * 150], seed=1)
    moved = (grown.iloc[: len(ids)].to_numpy() != splits.to_numpy()).mean()
    assert moved < 0.02


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(["a"], ["x"], {"train": 0.9, "val": 0.2, "test": 0.0})
    with pytest.raises(ValueError, match="exactly"):
        assign_splits(["a"], ["x"], {"train": 1.0})
    with pytest.raises(ValueError, match="unique"):
        assign_splits(["a", "a"], ["x", "x"])


# --- rendering ---------------------------------------------------------------------------------------


def rect(x0, y0, x1, y1, height=H, width=W):
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def gradient_jpeg(seed: int = 0, height: int = H, width: int = W) -> bytes:
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 40 * seed % 255)], axis=-1)
    return cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


def test_binary_mask_is_the_nearest_resized_union_and_survives_jpeg():
    counts = [encode_mask(rect(0, 0, 32, 24))["counts"], encode_mask(rect(16, 12, 48, 36))["counts"]]
    expected = cv2.resize(
        (rect(0, 0, 32, 24) | rect(16, 12, 48, 36)), (32, 24), interpolation=cv2.INTER_NEAREST
    )
    mask = binary_mask(counts, H, W, SPEC)
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask == 255, expected == 1)
    decoded = cv2.imdecode(np.frombuffer(render_mask(counts, H, W, SPEC), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 2 and decoded.dtype == np.uint8 and decoded.shape == (24, 32)
    np.testing.assert_array_equal(decoded >= 128, expected == 1)
    assert render_mask([], H, W, SPEC) and binary_mask([], H, W, SPEC).max() == 0


def test_sample_image_is_resized_not_drawn_on():
    source = gradient_jpeg()
    sample = cv2.imdecode(np.frombuffer(render_image(source, SPEC, (H, W)), np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.resize(
        cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR),
        (32, 24),
        interpolation=cv2.INTER_LINEAR,
    )
    assert sample.shape == (24, 32, 3)
    assert np.abs(sample.astype(int) - expected.astype(int)).max() <= 12  # JPEG noise only, no overlay


def test_misaligned_or_broken_sources_are_refused():
    with pytest.raises(RenderError, match="masks are"):
        render_image(gradient_jpeg(), SPEC, (H + 1, W))
    with pytest.raises(RenderError, match="does not decode"):
        render_image(b"not a jpeg", SPEC)


# --- collect + publish -------------------------------------------------------------------------------


def write_shard(
    store,
    shard: str,
    instances: dict[str, list[np.ndarray]],
    labels: dict[str, str],
    fp="fp1",
    missing_images=(),
):
    """A shard as the upstream stages + pseudo_labels leave it in storage."""
    rows = []
    for image_id, masks in instances.items():
        for cid, mask in enumerate(masks):
            rows.append(
                {
                    "image_id": image_id,
                    "candidate_id": cid,
                    "rank": cid,
                    "phrase": "thing",
                    "x0": 0.0,
                    "y0": 0.0,
                    "x1": 1.0,
                    "y1": 1.0,
                    "box_score": 0.9,
                    "text_score": 0.9,
                    "mask_score": 0.9,
                    "rle_counts": encode_mask(mask)["counts"],
                    "height": H,
                    "width": W,
                    "mask_area": int(mask.sum()),
                    "mask_x": 0.0,
                    "mask_y": 0.0,
                    "mask_w": 1.0,
                    "mask_h": 1.0,
                    "area_fraction": mask.sum() / (H * W),
                    "box_coverage": 0.1,
                    "thresholds_fingerprint": fp,
                }
            )
    kept = pd.DataFrame(rows, columns=PSEUDO_LABELS.names)
    write_parquet(store, layout.pseudo_labels(shard), pseudo_labels_table(kept, fp))
    ids = sorted(labels)
    write_parquet(
        store,
        layout.detection_images(shard),
        pd.DataFrame({"image_id": ids, "width": W, "height": H, "num_candidates": 1}),
    )
    write_parquet(
        store,
        layout.image_index(shard),
        pd.DataFrame(
            {
                "image_id": ids,
                "url": [f"https://x/{i}.jpg" for i in ids],
                "label": [labels[i] for i in ids],
                "sha256": [f"sha-{i}" for i in ids],
                "status": "ok",
            }
        ),
    )
    for n, image_id in enumerate(ids):
        if image_id not in missing_images:
            store.put_bytes(layout.image(shard, image_id), gradient_jpeg(n))


def two_shards(store, **kwargs):
    write_shard(
        store,
        "shard-00000",
        {"a": [rect(0, 0, 10, 10), rect(5, 5, 20, 20)], "b": [rect(0, 0, 64, 48)]},
        {"a": "cat", "b": "dog", "e": "cat"},
        **kwargs,
    )
    write_shard(store, "shard-00001", {"c": [rect(10, 10, 30, 30)]}, {"c": "cat", "f": "dog"}, **kwargs)


def test_collect_reads_every_shard_with_provenance(tmp_path):
    store = LocalObjectStore(tmp_path)
    two_shards(store)
    store.put_json(
        layout.provenance(layout.detections("shard-00000")),
        {"model_variant": "swint_ogc", "checkpoint_sha256": "abc"},
    )
    store.put_json(
        layout.provenance(layout.masks("shard-00000")),
        {
            "model": "sam2.1",
            "variant": "hiera_large",
            "checkpoint_sha256": "def",
            "backend": "sam2",
            "fingerprint": "f9",
        },
    )
    collected = collect(store)
    assert collected.shards == ["shard-00000", "shard-00001"]
    samples = collected.samples.set_index("image_id")
    assert sorted(samples.index) == ["a", "b", "c", "e", "f"]  # empty images included, filtered later
    assert samples.loc["a", "instance_count"] == 2 and samples.loc["e", "instance_count"] == 0
    assert samples.loc["a", "mask_fraction"] == pytest.approx((100 + 225 - 25) / (H * W))
    assert samples.loc["a", "url"] == "https://x/a.jpg" and samples.loc["f", "label"] == "dog"
    assert (
        samples.loc["a", "detector_model"] == "swint_ogc"
        and samples.loc["a", "detector_checkpoint_sha256"] == "abc"
    )
    assert samples.loc["a", "segmenter_model"] == "sam2.1/hiera_large"
    assert samples.loc["a", "segmenter_checkpoint_sha256"] == "def"
    assert (
        samples.loc["a", "segmenter_backend"] == "sam2" and samples.loc["a", "segmenter_fingerprint"] == "f9"
    )
    assert samples.loc["c", "detector_model"] is None  # no sidecar for that shard
    assert set(samples["thresholds_fingerprint"]) == {"fp1"}
    assert len(collected.instances) == 4


def published_files(store, root):
    return sorted(info.key.removeprefix(root + "/") for info in store.list(root + "/"))


def test_publish_writes_the_autosam2_layout_and_flips_the_pointer(store):
    two_shards(store)
    collected = collect(store)
    samples = collected.samples[collected.samples["instance_count"] > 0].reset_index(drop=True)
    summary = publish_dataset(
        store,
        samples,
        collected.instances,
        version="v1",
        spec=SPEC,
        fractions={"train": 0.5, "val": 0.25, "test": 0.25},
        info={"note": "x"},
    )
    root = current_root(store)
    assert root == summary.root == "autosam2/versions/v1"
    assert published_files(store, root) == sorted(
        [
            "coco.json",
            "manifest.jsonl",
            "splits/train.txt",
            "splits/val.txt",
            "splits/test.txt",
            *(f"samples/{i}.jpg" for i in "abc"),
            *(f"binary_masks/{i}_binarymask.jpg" for i in "abc"),
        ]
    )
    split_ids = {s: store.get_text(split_key(root, s)).split() for s in ("train", "val", "test")}
    assert sorted(sum(split_ids.values(), [])) == ["a", "b", "c"]
    manifest = [json.loads(line) for line in store.get_text(f"{root}/manifest.jsonl").splitlines()]
    by_id = {m["id"]: m for m in manifest}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"] == {
        "id": "a",
        "url": "https://x/a.jpg",
        "label": "cat",
        "shard": "shard-00000",
        "split": next(s for s, ids in split_ids.items() if "a" in ids),
        "thresholds_fingerprint": "fp1",
        "detector_model": None,
        "detector_backend": None,
        "detector_checkpoint_sha256": None,
        "detector_fingerprint": None,
        "segmenter_model": None,
        "segmenter_backend": None,
        "segmenter_checkpoint_sha256": None,
        "segmenter_fingerprint": None,
        "instance_count": 2,
        "mask_fraction": round(300 / (H * W), 6),
        "width": W,
        "height": H,
        "source_sha256": "sha-a",
        "verified": False,
        "source_key": "images/shard-00000/a.jpg",
    }
    mask = cv2.imdecode(np.frombuffer(store.get_bytes(mask_key(root, "b")), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (24, 32) and (mask >= 128).all()  # b's single instance covers the whole image
    coco = json.loads(store.get_bytes(f"{root}/coco.json"))
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 4
    assert {i["sample_file"] for i in coco["images"]} == {"samples/a.jpg", "samples/b.jpg", "samples/c.jpg"}
    assert read_current(store)["split_sizes"] == summary.split_sizes


def test_republishing_keeps_old_versions_for_readers_then_deletes_them(tmp_path):
    store = LocalObjectStore(tmp_path)
    two_shards(store)
    collected = collect(store)
    publish = lambda version: publish_dataset(  # noqa: E731
        store, collected.samples, collected.instances, version=version, spec=SPEC, keep_versions=2
    )
    first = publish("v1")
    assert first.reused_samples == 0 and first.samples == 5  # empty images included when passed in
    second = publish("v2")
    assert second.reused_samples == 5  # same sources and spec: samples are copied, not re-encoded
    assert store.get_bytes(sample_key(second.root, "a")) == store.get_bytes(sample_key(first.root, "a"))
    assert published_files(store, first.root)  # previous version still readable
    third = publish("v3")
    assert third.deleted_versions == ["v1"] and published_files(store, first.root) == []
    assert [h["version"] for h in read_current(store)["history"]] == ["v3", "v2"]
    with pytest.raises(ValueError, match="already exists"):
        publish("v3")


def test_unrenderable_samples_are_skipped_and_reported(tmp_path):
    store = LocalObjectStore(tmp_path)
    two_shards(store, missing_images=("c",))
    collected = collect(store)
    summary = publish_dataset(store, collected.samples, collected.instances, version="v1", spec=SPEC)
    assert summary.samples == 4 and summary.failures == 1 and "shard-00001/c" in summary.failure_examples[0]
    manifest_ids = [
        json.loads(line)["id"] for line in store.get_text(f"{summary.root}/manifest.jsonl").splitlines()
    ]
    assert "c" not in manifest_ids


def test_a_failed_publish_leaves_no_partial_version_and_keeps_the_pointer(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path)
    two_shards(store)
    collected = collect(store)
    publish_dataset(store, collected.samples, collected.instances, version="v1", spec=SPEC)
    before = store.get_bytes(CURRENT_KEY)
    real_put = store.put_text

    def failing_put(key, text):
        if key.endswith("splits/val.txt"):
            raise OSError("disk full")
        real_put(key, text)

    monkeypatch.setattr(store, "put_text", failing_put)
    with pytest.raises(OSError, match="disk full"):
        publish_dataset(store, collected.samples, collected.instances, version="v2", spec=SPEC)
    assert published_files(store, "autosam2/versions/v2") == []
    assert store.get_bytes(CURRENT_KEY) == before and current_root(store) == "autosam2/versions/v1"


def test_publishing_nothing_is_an_error(tmp_path):
    store = LocalObjectStore(tmp_path)
    two_shards(store)
    collected = collect(store)
    with pytest.raises(ValueError, match="no samples"):
        publish_dataset(store, collected.samples.iloc[:0], collected.instances, version="v1", spec=SPEC)
