"""The review loop end to end, against a real Label Studio on 127.0.0.1, driven as a user and a reviewer:
labels -> review tasks pushed -> a reviewer accepts, fixes a mask, rejects one, adds a missed object ->
the sensor materializes reviewed_labels -> label_quality proposes thresholds -> `pseudolabel thresholds
adopt` -> relabel (no model worker) -> the dataset and the exports carry the reviewer's masks, verified."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context, materialize
from label_helpers import SHARDS, H, W, seed_shard

from dagster_project.automation import label_studio_reviews_sensor
from dagster_project.definitions import defs
from dagster_project.resource_defs import resources_from_env
from pseudolabel import layout
from pseudolabel.dataset.publish import current_root
from pseudolabel.exports.label_studio import brush_result, brush_rle_decode
from pseudolabel.exports.publish import read_current_export
from pseudolabel.labels.thresholds import DEFAULT_THRESHOLDS_PATH, THRESHOLDS_ENV, load_thresholds
from pseudolabel.review.corrections import read_reviewed
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore
from resources.label_studio import LabelStudioResource
from resources.storage import LocalStorageResource
from resources.thresholds import ThresholdsResource


def chain(*names: str) -> list:
    built = defs()
    return [built.get_assets_def(name) for name in names]


def outcome_counts(metadata) -> dict[str, int]:
    return {k.removeprefix("instances_"): v.value for k, v in metadata.items() if k.startswith("instances_")}


def sdk_decode(python: str, rles: list[list[int]], height: int, width: int) -> list[np.ndarray]:
    """Brush RLEs decoded by label-studio-sdk's own converter, in Label Studio's virtualenv."""
    script = (
        "import json, sys\n"
        "from label_studio_sdk.converter.brush import decode_rle\n"
        "rles, h, w = json.load(sys.stdin)\n"
        "out = [(decode_rle(r).reshape(h, w, 4)[:, :, 3] > 0).astype(int).ravel().tolist() for r in rles]\n"
        "json.dump(out, sys.stdout)\n"
    )
    done = subprocess.run(
        [python, "-c", script],
        input=json.dumps([rles, height, width]),
        capture_output=True,
        text=True,
        check=True,
    )
    return [np.asarray(m, bool).reshape(height, width) for m in json.loads(done.stdout)]


@pytest.fixture
def loop(label_studio, tmp_path, monkeypatch):
    """A store inside Label Studio's document root with two labelled shards, and the resources."""
    root = Path(label_studio.document_root) / f"store-{uuid.uuid4().hex[:8]}"
    store = LocalObjectStore(root)
    for n, shard in enumerate(SHARDS):
        seed_shard(store, shard, images=24, seed=n)
    thresholds_file = tmp_path / "thresholds.yaml"
    shutil.copy(DEFAULT_THRESHOLDS_PATH, thresholds_file)
    monkeypatch.setenv(THRESHOLDS_ENV, str(thresholds_file))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", SHARDS)
    resources = {
        "storage": LocalStorageResource(root=str(root)),
        "thresholds": ThresholdsResource(),
        "label_studio": LabelStudioResource(
            url=label_studio.url,
            token=label_studio.token,
            project_title=f"review {root.name}",
            local_files_document_root=str(label_studio.document_root),
        ),
    }
    yield store, instance, resources, thresholds_file
    shutil.rmtree(root, ignore_errors=True)


def test_the_review_loop_through_label_studio(loop, label_studio, tmp_path):
    store, instance, resources, thresholds_file = loop
    run = lambda names, **kw: materialize(chain(*names), instance=instance, resources=resources, **kw)  # noqa: E731
    for shard in SHARDS:
        assert run(["pseudo_labels"], partition_key=shard).success

    # 1. The queue goes to Label Studio; pushing it again duplicates nothing.
    config = {"uniform_per_class": 3, "near_threshold_per_class": 2, "disagreement_per_class": 1}
    queued = run(["review_queue"], run_config={"ops": {"review_queue": {"config": config}}})
    meta = queued.asset_materializations_for_node("review_queue")[0].metadata
    client = label_studio.client()
    project = store.get_json(layout.REVIEW_STATE)["project_id"]
    tasks = client.list_tasks(project)
    assert meta["tasks_created"].value == len(tasks) == meta["images_queued"].value > 0
    again = run(["review_queue"], run_config={"ops": {"review_queue": {"config": config}}})
    assert again.asset_materializations_for_node("review_queue")[0].metadata["tasks_created"].value == 0
    assert len(client.list_tasks(project)) == len(tasks)
    # Label Studio serves the task's image from the store (local-files storage), byte for byte.
    first = tasks[0]["data"]
    assert client.get_bytes(first["image"]) == store.get_bytes(
        layout.image(first["shard"], first["image_id"])
    )

    # 2. A reviewer: accepts one task as is, widens a mask, rejects a proposal, adds a missed object.
    with_regions = [t for t in tasks if len(t["predictions"][0]["result"]) >= 2]
    accept, fix, reject = with_regions[:3]
    results = {
        name: task["predictions"][0]["result"]
        for name, task in zip(("a", "f", "r"), (accept, fix, reject), strict=True)
    }
    client.create_annotation(accept["id"], results["a"])
    fixed_region = results["f"][0]
    fixed_mask = brush_rle_decode(fixed_region["value"]["rle"], H, W).copy()
    fixed_mask[: H // 4, : W // 4] = True
    label = fixed_region["value"]["brushlabels"][0]
    widened = {**brush_result(fixed_mask, candidate_id=0, label=label, score=None), "id": fixed_region["id"]}
    added_mask = np.zeros((H, W), bool)
    added_mask[H - 10 :, W - 12 :] = True
    added = {**brush_result(added_mask, candidate_id=0, label=label, score=None), "id": "reviewer1"}
    client.create_annotation(fix["id"], [widened, *results["f"][1:], added])
    client.create_annotation(reject["id"], results["r"][1:])

    # 3. The sensor sees the reviews and asks for reviewed_labels; nothing new on the next tick.
    context = build_sensor_context(instance=instance, resources=resources)
    request = label_studio_reviews_sensor(context)
    assert isinstance(request, RunRequest)
    reviewed_run = run(["reviewed_labels"])
    assert isinstance(label_studio_reviews_sensor(context), SkipReason)
    outcomes = outcome_counts(reviewed_run.asset_materializations_for_node("reviewed_labels")[0].metadata)
    shown = sum(len(results[k]) for k in "afr")
    assert outcomes == {"accepted": shown - 2, "corrected": 1, "rejected": 1, "added": 1}
    reviewed = read_reviewed(store)
    fixed = reviewed.loc[(reviewed["task_id"] == fix["id"]) & (reviewed["outcome"] == "corrected")].iloc[0]
    assert np.array_equal(decode_rle(fixed["rle_counts"], H, W).astype(bool), fixed_mask)

    # 4. label_quality proposes per-class thresholds from the reviews; no model runs.
    quality = materialize(
        chain("label_quality"),
        instance=instance,
        # The code location's model resources, as in production: with reviewed gold they stay unused.
        resources={**resources_from_env(), **resources},
        run_config={"ops": {"label_quality": {"config": {"target_precision": 0.5}}}},
    )
    quality_meta = quality.asset_materializations_for_node("label_quality")[0].metadata
    assert quality_meta["gold_source"].value == "reviewed"
    assert "detector" not in quality_meta  # no model worker ran (its report names the detector)
    assert quality_meta["gold_images"].value == 3
    proposal_path = quality_meta["proposal_yaml"].value
    assert "Proposed pseudo-label thresholds" in Path(proposal_path).read_text()

    # 5. Adopt it as a user does (the README's command), then relabel: pseudo_labels only, no worker.
    env = {**os.environ, "PSEUDOLABEL_STORAGE": str(store.uri()), THRESHOLDS_ENV: str(thresholds_file)}
    adopted = subprocess.run(
        [str(Path(sys.executable).with_name("pseudolabel")), "thresholds", "adopt"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert adopted.returncode == 0, adopted.stderr
    assert load_thresholds(thresholds_file) == load_thresholds(proposal_path)
    for shard in SHARDS:
        assert run(["pseudo_labels"], partition_key=shard).success

    # 6. A new dataset version and exports: the reviewed images carry the reviewer's masks, verified.
    published = run(
        ["autosam2_manifest", "dataset_exports"],
        run_config={"ops": {"autosam2_manifest": {"config": {"width": 32, "height": 32}}}},
    )
    assert published.success
    manifest = [
        json.loads(line) for line in store.get_text(f"{current_root(store)}/manifest.jsonl").splitlines()
    ]
    verified = {m["id"] for m in manifest if m["verified"]}
    assert verified == {accept["data"]["image_id"], fix["data"]["image_id"], reject["data"]["image_id"]}
    export = read_current_export(store)
    fixed_image = fix["data"]["image_id"]
    split = next(m["split"] for m in manifest if m["id"] == fixed_image)
    coco = json.loads(store.get_bytes(f"{export['root']}/annotations/instances_{split}.json"))
    (image,) = [i for i in coco["images"] if i["file_name"] == f"{fixed_image}.jpg"]
    masks = [
        decode_rle(a["segmentation"]["counts"], H, W).astype(bool)
        for a in coco["annotations"]
        if a["image_id"] == image["id"]
    ]
    assert any(np.array_equal(m, fixed_mask) for m in masks)
    assert any(np.array_equal(m, added_mask) for m in masks)
    assert all(a["verified"] for a in coco["annotations"] if a["image_id"] == image["id"])

    # 7. The exported Label Studio tasks go through Label Studio's own import, and label-studio-sdk's
    # brush decoder (in Label Studio's environment) reads back exactly the COCO masks of the same images.
    exported = json.loads(store.get_bytes(layout.export_label_studio_tasks(export["root"], split)))
    config_xml = store.get_text(layout.export_label_studio_config(export["root"]))
    imported_project = client.ensure_project(f"export {uuid.uuid4().hex[:8]}", config_xml)
    assert client.import_tasks(imported_project, exported, key="image_id").created == len(exported)
    regions = {
        (t["data"]["image_id"], r["id"]): r["value"]["rle"]
        for t in client.list_tasks(imported_project)
        for p in t["predictions"]
        for r in p["result"]
    }
    assert regions
    decoded = sdk_decode(label_studio.python, list(regions.values()), H, W)
    by_image = {i["id"]: i["file_name"].removesuffix(".jpg") for i in coco["images"]}
    coco_masks = {
        (by_image[a["image_id"]], decode_rle(a["segmentation"]["counts"], H, W).astype(bool).tobytes())
        for a in coco["annotations"]
    }
    for (image_id, _), mask in zip(regions, decoded, strict=True):
        assert (image_id, mask.tobytes()) in coco_masks


def test_a_precision_gate_stops_the_publish(loop, label_studio):
    """A class whose reviewed precision misses the target blocks the dataset: nothing is published and the
    failed check says which class."""
    store, instance, resources, _ = loop
    run = lambda names, **kw: materialize(  # noqa: E731
        chain(*names), instance=instance, resources=resources, raise_on_error=False, **kw
    )
    for shard in SHARDS:
        assert run(["pseudo_labels"], partition_key=shard).success
    config = {"uniform_per_class": 4, "near_threshold_per_class": 0, "disagreement_per_class": 0}
    assert run(["review_queue"], run_config={"ops": {"review_queue": {"config": config}}}).success
    client = label_studio.client()
    for task in client.list_tasks(store.get_json(layout.REVIEW_STATE)["project_id"]):
        client.create_annotation(task["id"], [])  # the reviewer rejects every proposal
    assert run(["reviewed_labels"]).success
    gate = {"target_precision": 0.9, "min_reviewed": 1, "width": 32, "height": 32}
    failed = run(["autosam2_manifest"], run_config={"ops": {"autosam2_manifest": {"config": gate}}})
    assert not failed.success
    checks = {e.check_name: e.passed for e in failed.get_asset_check_evaluations()}
    assert checks["reviewed_precision"] is False
    assert current_root(store) is None


REPO = Path(__file__).resolve().parents[1]


def readme_review_commands() -> list[str]:
    """The command lines of the README's review-loop block, as written."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The review loop") :]
    block = section[
        section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)
    ]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_the_readme_review_loop_commands_as_written(label_studio, tmp_path):
    """Each command of the README's review loop, exactly as written, in a shell-less subprocess with the
    variables the README names; a reviewer acts in Label Studio between the first two."""
    commands = readme_review_commands()
    assert [c.split()[0] for c in commands] == [
        "dagster",
        "dagster",
        "dagster",
        "pseudolabel",
        "dagster",
        "dagster",
    ]
    root = Path(label_studio.document_root) / f"store-{uuid.uuid4().hex[:8]}"
    store = LocalObjectStore(root)
    for n, shard in enumerate(SHARDS):
        seed_shard(store, shard, images=24, seed=n)
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("shards", SHARDS)
    thresholds_file = tmp_path / "thresholds.yaml"
    shutil.copy(DEFAULT_THRESHOLDS_PATH, thresholds_file)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PSEUDOLABEL_STORAGE": str(root),
        THRESHOLDS_ENV: str(thresholds_file),
        "PSEUDOLABEL_LABEL_STUDIO_URL": label_studio.url,
        "PSEUDOLABEL_LABEL_STUDIO_TOKEN": label_studio.token,
        "PSEUDOLABEL_LABEL_STUDIO_DOCUMENT_ROOT": str(label_studio.document_root),
    }
    bin_dir = Path(sys.executable).parent

    def run(command: str) -> str:
        done = subprocess.run(
            [str(bin_dir / command.split()[0]), *command.split()[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    for shard in SHARDS:  # the chain has labelled both shards
        run(
            f"dagster asset materialize -m dagster_project.definitions --select pseudo_labels --partition {shard}"
        )
    run(commands[0])  # review_queue
    client = label_studio.client()
    project = store.get_json(layout.REVIEW_STATE)["project_id"]
    tasks = client.list_tasks(project)
    assert tasks and all(t["predictions"] for t in tasks)
    for task in tasks[:4]:  # a reviewer accepts the first proposal of four images and rejects the rest
        client.create_annotation(task["id"], task["predictions"][0]["result"][:1])
    run(commands[1])  # reviewed_labels
    reviewed = read_reviewed(store)
    assert reviewed["task_id"].nunique() == 4 and set(reviewed["outcome"]) <= {"accepted", "rejected"}
    run(commands[2])  # label_quality
    output = run(commands[3])  # pseudolabel thresholds adopt
    proposals = sorted(root.glob("label_quality/*/thresholds.proposal.yaml"))
    assert len(proposals) == 1 and f"adopting {proposals[0]}" in output
    assert load_thresholds(thresholds_file) == load_thresholds(proposals[0])
    run(commands[4])  # pseudo_labels over the shard range, with the adopted thresholds
    run(commands[5])  # autosam2_manifest, dataset_exports
    manifest = [
        json.loads(line) for line in store.get_text(f"{current_root(store)}/manifest.jsonl").splitlines()
    ]
    assert sum(m["verified"] for m in manifest) == 4
    assert read_current_export(store)["version"]
