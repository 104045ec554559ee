"""Throughput of the GPU chain (Grounding DINO -> SAM2 -> RLE): the project's batched path vs the seeds'
sequential loop, on the same device, the same images and the same (random) weights.

    seeds:  per image: PIL decode -> groundingdino.util.inference.predict (fp32)
            -> SAM2ImagePredictor.set_image / predict (fp32, full-resolution float masks on the host)
            -> pycocotools.encode
    ours:   run_detection + run_segmentation (pseudolabel.models): batched encoders, captions encoded
            once, bf16 autocast on CUDA, decode/resize in background threads, RLE on the device

Both keep the top --boxes candidates per image so SAM2 does the same work. Weights are random (no
download): this measures throughput only and says nothing about label quality (a smoke run).

    python bench/gpu_chain.py                      # GPU: Swin-T + SAM2.1-L, 1024 px photos
    python bench/gpu_chain.py --size tiny          # CPU smoke: tiny architectures, small images
    python bench/gpu_chain.py --compile            # Grounding DINO through torch.compile (static shapes)
    python bench/gpu_chain.py --decode-on-device   # JPEGs decoded in batches on the device (nvJPEG)
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test images

from images import random_jpeg  # noqa: E402

from pseudolabel.models import tiny  # noqa: E402
from pseudolabel.models.grounding_dino import GroundingDinoDetector  # noqa: E402
from pseudolabel.models.grounding_dino_build import build_grounding_dino  # noqa: E402
from pseudolabel.models.interfaces import normalize_caption  # noqa: E402
from pseudolabel.models.runtime import resolve_device, resolve_precision  # noqa: E402
from pseudolabel.models.sam2_segmenter import Sam2Segmenter, build_sam2_model  # noqa: E402
from pseudolabel.models.stages import (  # noqa: E402
    DetectionSettings,
    ImageRef,
    SegmentationSettings,
    run_detection,
    run_segmentation,
)
from pseudolabel.rle import encode_host_masks  # noqa: E402

PROMPT = "plant ."


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full" if gpu else "tiny",
        help="full = released architectures; tiny = shrunken ones (CPU smoke runs)",
    )
    parser.add_argument("--dino-variant", default="swint_ogc", choices=["swint_ogc", "swinb_cogcoor"])
    parser.add_argument("--sam-variant", default="large", choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="long side of the synthetic photos (default 1024 full / 256 tiny)",
    )
    parser.add_argument("--images", type=int, default=64 if gpu else 4)
    parser.add_argument("--batch-size", type=int, default=8 if gpu else 2)
    parser.add_argument("--boxes", type=int, default=10, help="candidates per image passed to SAM2")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed images per path first")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating timed runs per path; best is reported"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile Grounding DINO (static shapes: the warm-up pays the compilations)",
    )
    parser.add_argument(
        "--decode-on-device", action="store_true", help="decode each batch's JPEGs on the device (nvJPEG)"
    )
    return parser.parse_args()


def build_models(args: argparse.Namespace, device: torch.device, precision: str, workdir: Path):
    full = args.size == "full"
    bert = tiny.write_bert_dir(workdir / "bert", size="base" if full else "tiny")
    dino = build_grounding_dino(
        args.dino_variant, None, str(bert), overrides=None if full else tiny.TINY_GROUNDING_DINO
    )
    sam = build_sam2_model(args.sam_variant, None, overrides=[] if full else tiny.tiny_sam2_overrides())
    short, long = (800, 1333) if full else (tiny.TINY_DINO_IMAGE_SIZE, tiny.TINY_DINO_MAX_SIZE)
    detector = GroundingDinoDetector(
        dino,
        device=device,
        precision=precision,
        batch_size=args.batch_size,
        image_size=short,
        max_size=long,
        compile=args.compile,
        decode_on_device=args.decode_on_device,
    )
    segmenter = Sam2Segmenter(sam, device=device, precision=precision, batch_size=args.batch_size)
    return detector, segmenter


def synthetic_photos(count: int, long_side: int) -> dict[str, bytes]:
    """Smooth random JPEGs, alternating landscape 4:3 and portrait 3:4 (so batches need padding)."""
    short_side = long_side * 3 // 4
    return {
        f"{i:04d}": random_jpeg(*((long_side, short_side) if i % 2 == 0 else (short_side, long_side)), seed=i)
        for i in range(count)
    }


def run_ours(photos: dict[str, bytes], detector, segmenter, args) -> int:
    refs = []
    for image_id, data in photos.items():
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            refs.append(ImageRef(image_id, *image.size))
    settings = DetectionSettings(prompt=PROMPT, box_floor=0.0, text_floor=0.0, max_candidates=args.boxes)
    found = run_detection(refs, photos.__getitem__, detector, settings, workers=args.workers)
    masks = run_segmentation(
        found.images, photos.__getitem__, segmenter, SegmentationSettings(), workers=args.workers
    )
    return masks.num_candidates


def run_seeds(photos: dict[str, bytes], detector, segmenter, args, device: torch.device) -> int:
    """The public Grounded-SAM recipe, one image at a time, fp32."""
    import groundingdino.datasets.transforms as T
    from groundingdino.util.inference import predict
    from PIL import Image
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from torchvision.ops import box_convert

    transform = T.Compose(
        [
            T.RandomResize([detector.image_size], max_size=detector.max_size),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    predictor = SAM2ImagePredictor(segmenter.model)
    size = segmenter.image_size
    predictor._bb_feat_sizes = [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]  # stock assumes 1024
    masks_total = 0
    for data in photos.values():
        source = Image.open(io.BytesIO(data)).convert("RGB")
        image = np.asarray(source)
        tensor, _ = transform(source, None)
        boxes, scores, _ = predict(
            detector.model,
            tensor,
            normalize_caption(PROMPT),
            box_threshold=0.0,
            text_threshold=0.0,
            device=str(device),
        )
        top = torch.argsort(-scores, stable=True)[: args.boxes]
        height, width = image.shape[:2]
        xyxy = box_convert(
            boxes[top] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy"
        ).numpy()
        predictor.set_image(image)
        masks, _, _ = predictor.predict(box=xyxy, multimask_output=False)
        masks = masks.reshape(-1, height, width) > 0
        masks_total += len(encode_host_masks(masks))
    return masks_total


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    long_side = args.image_size or (1024 if args.size == "full" else 256)
    with tempfile.TemporaryDirectory() as workdir:
        detector, segmenter = build_models(args, device, precision, Path(workdir))
    photos = synthetic_photos(args.images, long_side)
    warm = dict(list(synthetic_photos(max(args.warmup, 1), long_side).items()))

    # Warm both paths (CUDA context, cuDNN autotuning, allocator) before timing.
    run_ours(warm, detector, segmenter, args)
    run_seeds(warm, detector, segmenter, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Alternate the paths and keep each one's best run: robust to other load on a shared machine.
    seeds_s = ours_s = float("inf")
    for _ in range(args.repeats):
        seeds_s = min(seeds_s, timed(lambda: run_seeds(photos, detector, segmenter, args, device), device))
        ours_s = min(ours_s, timed(lambda: run_ours(photos, detector, segmenter, args), device))
    seeds_ips, ours_ips = len(photos) / seeds_s, len(photos) / ours_s

    print(f"SMOKE RUN: random weights ({args.size} architectures) -- throughput only, not label quality")
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"ours precision {precision}, seeds precision fp32"
    )
    print(
        f"models: Grounding DINO {args.dino_variant} + SAM2.1 {args.sam_variant}; {len(photos)} images, "
        f"long side {long_side} px, {args.boxes} boxes/image, batch {args.batch_size}, {args.workers} workers, "
        f"best of {args.repeats}"
    )
    print(f"seeds (sequential, fp32): {seeds_ips:8.3f} img/s  ({seeds_s:.2f} s)")
    print(f"ours  (batched)         : {ours_ips:8.3f} img/s  ({ours_s:.2f} s)")
    print(f"speed-up                : {ours_ips / seeds_ips:8.2f}x")
    if device.type == "cuda":
        print(f"peak GPU memory          : {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
