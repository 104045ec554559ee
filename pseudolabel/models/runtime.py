"""How the models run: device and precision, input decoding and normalisation, seeded init."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from pseudolabel.models.interfaces import PreparedImage

AUTO = "auto"
BF16 = "bf16"
FP32 = "fp32"

# ImageNet statistics, the input normalisation both models were trained with.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str = AUTO) -> torch.device:
    """``auto`` -> the first CUDA device when present, else the CPU; anything else as torch reads it."""
    if device == AUTO:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 elsewhere (CPU bf16 autocast is slower, not faster)."""
    if precision == AUTO:
        return BF16 if device.type == "cuda" else FP32
    if precision not in (BF16, FP32):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    return precision


@contextlib.contextmanager
def inference(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast when asked (weights stay fp32)."""
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == BF16),
    ):
        yield


def pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory makes the later host->GPU copy asynchronous; pointless for CPU runs."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


# (width, height) of the original image -> (width, height) the model input will be resized to.
TargetSize = Callable[[int, int], tuple[int, int]]


def prepare_image(image_id: str, data: bytes, target: TargetSize, device: torch.device) -> PreparedImage:
    """Decode ``data`` and resize it to ``target(width, height)`` (runs in CPU workers).

    ``pixels``: (3, h, w) uint8 at the target size, pinned when ``device`` is CUDA; ``width`` and
    ``height``: the ORIGINAL size, the frame every stored box and mask is expressed in. Images are
    stored upright already (EXIF applied upstream), so no orientation handling here.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        out_w, out_h = target(width, height)
        # JPEG DCT scaling: decode a 12 MP photo at 1/2..1/8 scale when the model input is ~1 MP,
        # never below the target size. Several times faster than a full decode.
        image.draft("RGB", (out_w, out_h))
        rgb = image.convert("RGB")
        if rgb.size != (out_w, out_h):
            rgb = rgb.resize((out_w, out_h), Image.Resampling.BILINEAR)
        array = np.array(rgb)  # (h, w, 3), a writable copy: torch.from_numpy warns on read-only arrays
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return PreparedImage(image_id, width, height, pin(pixels, device))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init (random-weight smoke runs must be reproducible) without
    disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (3, 1, 1): ImageNet normalisation folded into one affine map of the
    0..255 uint8 input, ``pixels.float() * scale - shift``."""
    scale = (1.0 / (255.0 * torch.tensor(_STD, device=device))).view(3, 1, 1)
    shift = (torch.tensor(_MEAN, device=device) / torch.tensor(_STD, device=device)).view(3, 1, 1)
    return scale, shift


def describe_runtime(
    info: dict[str, Any], device: torch.device, precision: str, batch_size: int, input_size: str
) -> dict[str, Any]:
    """A model's ``describe()``: its identity ``info`` plus how it runs."""
    return {
        **info,
        "device": str(device),
        "precision": precision,
        "batch_size": batch_size,
        "input_size": input_size,
    }
