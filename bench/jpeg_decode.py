"""JPEG decode + resize to the model input, per image: the CPU workers' PIL path vs the device path.

    pil      pseudolabel.models.runtime.prepare_image: PIL with JPEG draft mode (DCT scaling), BILINEAR
             resize, (3, h, w) uint8; what every CPU worker does per image today
    device   ImageDecoding(on_device=True): the worker only parses the header (``header`` column), then
             ONE torchvision.io.decode_jpeg call per batch and an antialiased bilinear resize per image
             on ``--device``

On a CPU-only machine ``--device cpu`` runs the device path on libjpeg-turbo: the ratio then says how
much the full decode (no DCT scaling) + torch resize costs against PIL's draft decode, NOT what nvJPEG
does. Run with ``--device cuda`` on a GPU machine for that (the CUDA timings include a synchronize).
Images are synthetic photos (smooth colour fields + sharp texture, quality 90, ~0.25-0.5 bytes/pixel
like phone photos); the target is Grounding DINO's input (short side 800, long side <= 1333). Also
printed: max / mean absolute pixel difference between the two paths.

    python bench/jpeg_decode.py                       # 2048x1536 and 640x480, 1 thread, batch 8
    python bench/jpeg_decode.py --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pseudolabel.models.grounding_dino import input_size  # noqa: E402
from pseudolabel.models.runtime import ImageDecoding, prepare_image  # noqa: E402

SIZES = {"2048x1536": (2048, 1536), "640x480": (640, 480)}


def photo(width: int, height: int, seed: int) -> bytes:
    """Smooth colour fields plus sharp texture, so entropy decoding costs what a photo's does."""
    rng = np.random.default_rng(seed)
    fields = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(fields).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    texture = rng.normal(0, 18, (height, width, 1))
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.8)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def target(width: int, height: int) -> tuple[int, int]:
    return input_size(width, height, 800, 1333)


def best_of(repeats: int, run: Callable[[], object], sync: Callable[[], None]) -> float:
    """Fastest wall seconds of ``repeats`` runs (after one warm-up run)."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def one(size: tuple[int, int], decoding: ImageDecoding, batch: int, repeats: int) -> str:
    """The table row for ``batch`` photos of ``size``."""
    sync = torch.cuda.synchronize if decoding.device.type == "cuda" else lambda: None
    images = [photo(*size, seed) for seed in range(batch)]
    cpu = torch.device("cpu")
    pil = best_of(repeats, lambda: [prepare_image("x", d, target, cpu) for d in images], sync)
    header = best_of(repeats, lambda: [decoding.prepare("x", d, target) for d in images], sync)
    prepared = [decoding.prepare("x", d, target) for d in images]
    on_device = best_of(repeats, lambda: decoding.decoded(prepared), sync)
    ours = decoding.decoded(prepared)[0].pixels.cpu()
    diff = (ours.int() - prepare_image("x", images[0], target, cpu).pixels.int()).abs().float()
    per_image = [1000 * seconds / batch for seconds in (pil, header, on_device)]
    name, model_input = "x".join(map(str, size)), "x".join(map(str, target(*size)))
    return (
        f"{name:>10} {len(images[0]) // 1024:>6} {model_input:>10} {per_image[0]:>8.2f} {per_image[1]:>8.3f}"
        f" {per_image[2]:>8.2f} {pil / on_device:>6.2f}  max {diff.max():.0f} mean {diff.mean():.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (PIL uses one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoding = ImageDecoding(torch.device(args.device), on_device=True)
    print(
        f"device {args.device}, batch {args.batch}, torch threads {args.threads}; ms/image, best of {args.repeats}"
    )
    print(
        f"{'image':>10} {'KB':>6} {'input':>10} {'pil':>8} {'header':>8} {'device':>8} {'ratio':>6}  pixel diff"
    )
    for name in args.sizes:
        print(one(SIZES[name], decoding, args.batch, args.repeats))
    print(
        "ratio = pil / device (> 1: the device path is faster). The header column is what stays on the CPU\n"
        "workers with decode_on_device; the device column runs where --device says"
        + (" (here the CPU: libjpeg-turbo, not nvJPEG)." if decoding.device.type == "cpu" else ".")
    )
    assert decoding.fallbacks == {"not_jpeg": 0, "decode_error": 0}, decoding.fallbacks
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
