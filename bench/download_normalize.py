"""Benchmark: the normalized_images code path vs. a plain sequential requests + Pillow loop.

Both fetch the same ~640x480 JPEGs (a quarter of them EXIF-rotated) from a local DevServer
that adds per-image latency, and both end with upright RGB JPEGs on local disk.

    python -m bench.download_normalize [--images 200] [--latency 0.05] [--concurrency 32]   # from the repo root
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import piexif
import requests
from PIL import Image, ImageOps

from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import ALLOWED_NETWORKS_ENV, DownloadPolicy
from pseudolabel.images.index import SampleItem
from pseudolabel.images.shard import ShardOptions, process_shard
from pseudolabel.storage import LocalObjectStore
from pseudolabel.testing.servers import IMAGES_PATH, DevServer

ORIENTATIONS = (1, 1, 1, 6, 1, 3, 1, 8)  # every 8 images: one each of 3, 6 and 8


def synthetic_photo(seed: int, orientation: int) -> bytes:
    """A distinct, photo-like JPEG (smooth shading, edges, sensor noise), 640x480 upright."""
    rng = np.random.default_rng(seed)
    height, width = (640, 480) if orientation in (6, 8) else (480, 640)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    pixels = base + 60 * np.stack(
        [np.sin(x / rng.uniform(20, 90) + c) * np.cos(y / rng.uniform(20, 90)) for c in range(3)], -1
    )
    for _ in range(6):  # a few flat shapes with hard edges
        x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
        pixels[y0 : y0 + rng.integers(30, 200), x0 : x0 + rng.integers(30, 200)] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation, piexif.ImageIFD.Make: b"Bench"}})
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def asset_code_path(urls: list[str], root: Path, concurrency: int, decode_workers: int) -> float:
    """The functions normalized_images calls, on a local store; returns images/s."""
    items = [SampleItem(image_id=image_id_for_url(url), url=url, label="bench") for url in urls]
    options = ShardOptions(download=DownloadPolicy(concurrency=concurrency), decode_workers=decode_workers)
    started = time.perf_counter()
    result = process_shard(LocalObjectStore(root), "shard-00000", items, options)
    elapsed = time.perf_counter() - started
    assert result.stats.ok == len(urls), result.stats.reasons_markdown()
    return len(urls) / elapsed


def sequential_baseline(urls: list[str], root: Path) -> float:
    """Download, exif_transpose, convert to RGB, save JPEG, one image after the other; returns images/s."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with requests.Session() as session:  # keep-alive, so the baseline is not handicapped by handshakes
        for n, url in enumerate(urls):
            response = session.get(url, timeout=30)
            response.raise_for_status()
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(response.content))).convert("RGB")
            image.save(root / f"{n}.jpg", "JPEG", quality=95)
    return len(urls) / (time.perf_counter() - started)


def serve(images: dict[str, bytes], latency_s: float, address: Connection) -> None:
    """Child process: the server must not share the benchmarked process's GIL, as a remote one would not."""
    with DevServer(images=images, image_latency_s=latency_s, log_requests=False) as server:
        address.send(server.url)
        address.recv()  # block until the parent says stop


def main() -> None:
    # The benchmark's image server listens on loopback, which the pipeline refuses to fetch from unless
    # allowed (as the demo does): allow it for this process only.
    os.environ.setdefault(ALLOWED_NETWORKS_ENV, "127.0.0.0/8")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits per image")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of (a); the median is reported")
    args = parser.parse_args()

    print(f"generating {args.images} JPEGs ...", flush=True)
    images = {
        f"{n:04d}.jpg": synthetic_photo(n, ORIENTATIONS[n % len(ORIENTATIONS)]) for n in range(args.images)
    }
    mean_kb = sum(map(len, images.values())) / len(images) / 1024
    print(
        f"  mean size {mean_kb:.0f} KiB, server latency {args.latency * 1000:.0f} ms/image, {os.cpu_count()} CPUs"
    )

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(images, args.latency, child), daemon=True)
    server.start()
    try:
        base_url = parent.recv()
        urls = [f"{base_url}{IMAGES_PATH}{name}" for name in images]
        with tempfile.TemporaryDirectory() as tmp:
            # Warm both paths up (imports, plugin registry, first connections): a real shard has
            # thousands of images, so one-time costs must not dominate a 200-image measurement.
            asset_code_path(urls[:16], Path(tmp) / "warm-a", args.concurrency, args.decode_workers)
            sequential_baseline(urls[:2], Path(tmp) / "warm-b")
            runs = [
                asset_code_path(urls, Path(tmp) / f"asset-{n}", args.concurrency, args.decode_workers)
                for n in range(args.repeats)
            ]
            fast = statistics.median(runs)
            print(
                f"(a) asset code path (concurrency {args.concurrency}, {args.decode_workers} decode workers): "
                f"{fast:7.1f} images/s  (median of {args.repeats}: {', '.join(f'{r:.1f}' for r in runs)})"
            )
            slow = sequential_baseline(urls, Path(tmp) / "baseline")
            print(f"(b) sequential requests + Pillow loop: {slow:7.1f} images/s")
    finally:
        parent.send("stop")
        server.join(timeout=10)
    print(f"speed-up: {fast / slow:.1f}x (goal >= 8x)")


if __name__ == "__main__":
    main()
