"""Benchmark: re-threshold stored candidates for 100k images, as `pseudo_labels` does after a YAML edit.

    python bench/relabel.py                      # 100k images, ~10 candidates each, 10 shards
    python bench/relabel.py --images 20000 --policy all

Synthetic shards (real pycocotools RLE strings of drawn shapes, reused) are written to Parquet
bytes first; the timed part is exactly the asset's per-shard work:

* ``relabel``: :func:`pseudolabel.labels.relabel.relabel_shard` alone (thresholds, coverage, area,
  class-aware NMS, pick policy, cap) -- no RLE is decoded;
* ``shard end-to-end``: read the three Parquet tables, relabel, build + serialise the COCO JSON
  (area/bbox from the RLEs) and the label Parquet.

The baseline is the naive per-image Python loop in :mod:`pseudolabel.testing.reference_labels` (same
decisions, checked by the tests) run on a subset and extrapolated linearly.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pseudolabel.labels.coco import build_coco, category_names, coco_to_bytes  # noqa: E402
from pseudolabel.labels.relabel import (  # noqa: E402
    MASK_INPUT_COLUMNS,
    pseudo_labels_table,
    read_detections,
    relabel_shard,
)
from pseudolabel.labels.thresholds import PickPolicy, load_thresholds  # noqa: E402
from pseudolabel.testing.labels import synthetic_candidates  # noqa: E402
from pseudolabel.testing.reference_labels import naive_relabel  # noqa: E402


def to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, compression="zstd", index=False)
    return buffer.getvalue()


def read(data: bytes, columns: list[str]) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(data), columns=columns).to_pandas()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--candidates", type=float, default=10.0, help="mean candidates per image (Poisson)")
    parser.add_argument("--baseline-images", type=int, default=2_000)
    parser.add_argument(
        "--policy",
        choices=[p.value for p in PickPolicy],
        default=None,
        help="override the thresholds file's pick policy",
    )
    args = parser.parse_args()

    thresholds = load_thresholds()
    if args.policy:
        thresholds = thresholds.with_overrides(pick_policy=args.policy)
    per_shard = args.images // args.shards
    print(f"generating {args.shards} shards x {per_shard} images (~{args.candidates:g} candidates each) ...")
    stored = []
    for shard in range(args.shards):
        data = synthetic_candidates(per_shard, args.candidates, seed=shard, id_prefix=f"s{shard:03d}-")
        stored.append((to_parquet(data.detections), to_parquet(data.masks), to_parquet(data.images)))
    candidates = 0

    relabel_s = total_s = 0.0
    kept = 0
    for detections_bytes, masks_bytes, images_bytes in stored:
        started = time.perf_counter()
        detections = read_detections(detections_bytes)
        masks = read(masks_bytes, MASK_INPUT_COLUMNS)
        images = read(images_bytes, ["image_id", "width", "height"])
        t0 = time.perf_counter()
        result = relabel_shard(detections, masks, thresholds, images)
        relabel_s += time.perf_counter() - t0
        images = images.sort_values("image_id").assign(
            file_name=lambda f: "images/x/" + f["image_id"] + ".jpg"
        )
        coco = build_coco(result.kept, images, categories=category_names(detections["phrase"]))
        coco_to_bytes(coco)
        buffer = io.BytesIO()
        pq.write_table(pseudo_labels_table(result.kept, result.fingerprint), buffer, compression="zstd")
        total_s += time.perf_counter() - started
        candidates += len(detections)
        kept += result.num_kept

    subset = synthetic_candidates(args.baseline_images, args.candidates, seed=999)
    started = time.perf_counter()
    naive_relabel(subset.detections, subset.masks, thresholds)
    baseline_s = (time.perf_counter() - started) * per_shard * args.shards / args.baseline_images

    n = per_shard * args.shards
    print(f"\npolicy={thresholds.pick_policy.value}  images={n:,}  candidates={candidates:,}  kept={kept:,}")
    print(f"{'':34s}{'seconds':>10s}{'images/s':>14s}")
    for name, seconds in [
        ("relabel (vectorised)", relabel_s),
        ("shard end-to-end (read+COCO+write)", total_s),
        ("baseline: naive per-image loop*", baseline_s),
    ]:
        print(f"{name:34s}{seconds:10.2f}{n / seconds:14,.0f}")
    print(f"* measured on {args.baseline_images:,} images and extrapolated linearly to {n:,}")
    print(f"speed-up of relabel over the baseline: {baseline_s / relabel_s:,.0f}x")


if __name__ == "__main__":
    main()
