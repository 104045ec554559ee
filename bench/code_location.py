"""Benchmark: what the model workers changed -- code-location load cost, and model loads per backfill.

    python bench/code_location.py                          # fake models (instant, no torch)
    python bench/code_location.py --models random --repeats 1  # tiny real architectures, random weights

1. Code-location load, each in a fresh subprocess (median of --repeats): ``import
   dagster_project.definitions`` + ``defs`` on this (orchestrator) interpreter; time = the import
   (interpreter start-up excluded), RSS = peak (``VmHWM``). "before" is a RECONSTRUCTION: the old single
   environment cannot be installed any more (its antlr pins conflict), so it is the orchestrator load
   PLUS the model stack the old definitions imported (torch, torchvision, sam2, groundingdino,
   transformers) measured on the worker interpreter: time = sum, RSS = orchestrator RSS + (model-stack
   RSS - bare worker interpreter RSS). Goals: < 2 s and < 300 MB (MB = 2**20 bytes).
2. Model loads per 10-shard backfill of ``detections``: (a) one range run over the 10 shards (the
   backfill policy now), (b) 10 single-shard runs (the old policy). Loads = sum over runs of the step's
   ``model_loads_in_step``, and distinct worker pids; goal 1 per run. A single-shard warm-up run comes
   first and is not counted. Wall-time ratio (b)/(a) > 1 = what a range run saves.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("PSEUDOLABEL_STEP_RETRIES", "0")  # a failing step fails now (read at asset import)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from dagster import AssetKey, DagsterInstance, materialize  # noqa: E402
from PIL import Image  # noqa: E402

from assets.common import SHARDS_PARTITIONS_NAME  # noqa: E402
from assets.detections import detections  # noqa: E402
from pseudolabel import layout, schemas  # noqa: E402
from pseudolabel.ids import sha256_hex  # noqa: E402
from pseudolabel.storage import LocalObjectStore, write_parquet  # noqa: E402
from pseudolabel.workers.environment import built_worker_python  # noqa: E402
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource  # noqa: E402
from resources.storage import LocalStorageResource  # noqa: E402
from resources.workers import LocalModelWorkers  # noqa: E402

# Peak RSS = VmHWM, not ru_maxrss: Linux keeps the parent's peak in a child's ru_maxrss across fork+exec
# (this process already holds ~260 MB of Dagster, which a bare child would report as its own).
PROBE = """import json, time
t0 = time.perf_counter()
{}
s = time.perf_counter() - t0
print(json.dumps([s, int(next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM")))]))"""
ORCHESTRATOR = "import dagster_project.definitions as d\nd.defs()"
MODEL_STACK = "import torch, torchvision, sam2.build_sam, groundingdino.models, transformers"
START, END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def probe(python: str, body: str, repeats: int) -> tuple[float, float]:
    """Median (seconds, MB peak RSS) of running ``body`` in fresh ``python`` processes."""
    runs = []
    for _ in range(repeats):
        cmd = [python, "-W", "ignore", "-c", PROBE.format(body)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs) / 1024


def write_shards(store: LocalObjectStore, count: int, images: int, size: tuple[int, int]) -> list[str]:
    names = [layout.shard_name(i) for i in range(count)]
    for s, name in enumerate(names):
        rows = []
        for i in range(images):
            image_id = f"{s:04x}{i:012x}"
            pixels = np.random.default_rng(s * 100 + i).integers(0, 256, (size[1], size[0], 3), np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            store.put_bytes(layout.image(name, image_id), data)
            rows.append(
                dict(image_id=image_id, url=f"http://x/{image_id}.jpg", label="plant", width=size[0],
                     height=size[1], original_orientation=1, bytes=len(data), sha256=sha256_hex(data),
                     status="ok", error=None)
            )  # fmt: skip
        write_parquet(store, layout.image_index(name), pa.Table.from_pylist(rows, schema=schemas.IMAGE_INDEX))
    return names


def backfill(store: LocalObjectStore, detector, shards: list[str], runs: list[tuple[str, str]]) -> dict:
    """Materialize ``detections`` once per (first, last) shard range; seconds, loads, distinct pids."""
    resources = {
        "storage": LocalStorageResource(root=str(store.root)),
        "detector": detector,
        "segmenter": SegmenterResource(backend="fake"),
        "stage_settings": StageSettingsResource(),
        "model_workers": LocalModelWorkers(gpus="0"),
    }
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, shards)
        started = time.perf_counter()
        for first, last in runs:
            materialize([detections], instance=instance, resources=resources, tags={START: first, END: last})
        seconds = time.perf_counter() - started
        records = instance.fetch_materializations(AssetKey("detections"), limit=1000).records
    per_run: dict[str, int] = {}
    pids = set()
    for record in records:
        metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        per_run[record.run_id] = max(per_run.get(record.run_id, 0), metadata["model_loads_in_step"])
        pids.add(metadata["worker"]["pid"])
    return dict(
        s=seconds, runs=len(per_run), shards=len(records), loads=sum(per_run.values()), pids=len(pids)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", choices=["fake", "random"], default="fake")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--images", type=int, default=4, help="images per shard (96x64 JPEGs)")
    parser.add_argument("--worker-python", help="default: the built worker environment")
    args = parser.parse_args()
    worker = args.worker_python or built_worker_python(("worker", "worker-test")) or built_worker_python()

    print(f"1. code-location load (median of {args.repeats} fresh processes)")
    after_s, after_mb = probe(sys.executable, ORCHESTRATOR, args.repeats)
    print(f"   {'':44} {'load s':>8} {'peak RSS MB':>12}")
    print(f"   {'after:  orchestrator, import definitions':44} {after_s:8.2f} {after_mb:12.0f}")
    if worker:
        stack_s, stack_mb = probe(worker, MODEL_STACK, args.repeats)
        _, bare_mb = probe(worker, "pass", args.repeats)
        before_s, before_mb = after_s + stack_s, after_mb + stack_mb - bare_mb
        bare = f"(bare interpreter {bare_mb:.0f} MB)"
        print(f"   {'   model stack on the worker interpreter':44} {stack_s:8.2f} {stack_mb:12.0f}  {bare}")
        print(f"   {'before: RECONSTRUCTED (orch. + model stack)':44} {before_s:8.2f} {before_mb:12.0f}")
        print("   (reconstruction: old single environment cannot be installed any more: antlr pins conflict)")
        print(f"   before/after: time x{before_s / after_s:.1f}, RSS x{before_mb / after_mb:.1f}")
    else:
        print("   no built worker environment (`pseudolabel workers install`): no 'before' baseline")
    met = {True: "MET", False: "NOT MET"}
    print(f"   goals: load < 2 s {met[after_s < 2]}, peak RSS < 300 MB {met[after_mb < 300]}")

    if args.models == "random":  # real models run on the worker interpreter
        os.environ["PSEUDOLABEL_WORKER_PYTHON"] = worker or parser.error(
            "--models random needs --worker-python"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tiny = dict(checkpoint="random", tiny=True, text_encoder="tiny-random", cache_dir=f"{tmp}/models")
        detector = DetectorResource(**(tiny if args.models == "random" else {"backend": "fake"}))
        store = LocalObjectStore(Path(tmp) / "data")
        shards = write_shards(store, args.shards + 1, args.images, (96, 64))
        warmup, names = shards[0], shards[1:]
        backfill(store, detector, shards, [(warmup, warmup)])
        one = backfill(store, detector, shards, [(names[0], names[-1])])
        each = backfill(store, detector, shards, [(name, name) for name in names])
    print(
        f"\n2. {args.shards}-shard backfill of detections ({args.models} models, {args.images} images/shard)"
    )
    print(f"   {'':30} {'runs':>5} {'shards':>7} {'model loads':>12} {'worker pids':>12} {'wall s':>8}")
    for label, r in [("(a) one range run (now)", one), ("(b) one run per shard (before)", each)]:
        print(f"   {label:30} {r['runs']:5} {r['shards']:7} {r['loads']:12} {r['pids']:12} {r['s']:8.2f}")
    ok = one["loads"] == one["runs"] == 1 and each["loads"] == each["runs"]
    ratio = each["s"] / one["s"]
    print(f"   model loads per run: {'1 (goal MET)' if ok else 'NOT 1'}; wall time (b)/(a) = x{ratio:.1f}")


if __name__ == "__main__":
    main()
