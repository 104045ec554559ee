"""How the models run: device and precision, input decoding and normalisation, seeded init."""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

# Moved to the torch-free domain code (the CPU stages use it too); re-exported for the model code.
from pseudolabel.images.shard import usable_cpus as usable_cpus
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


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host synchronisation (pinned + ``non_blocking`` on CUDA:
    a pageable copy would wait for the stream)."""
    return pin(torch.from_numpy(np.ascontiguousarray(array)), device).to(device, non_blocking=True)


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (10-bit mantissa products, fp32
    accumulation); a no-op elsewhere. Process-wide, as torch's flags are."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class HostCopy:
    """Device tensors copied to host memory with ONE synchronisation point, which can come later.

    On CUDA the copies go into pinned buffers with ``non_blocking=True`` and an event is recorded;
    :meth:`wait` (thread-safe, syncs once) blocks on that event only. Several tensors travel as one
    byte buffer, so a CPU run reads them back in one ``.cpu()`` as well. ``tensors`` must be
    contiguous; any shapes and dtypes.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._specs = [(t.shape, t.dtype) for t in tensors]
        # Each part padded to 8 bytes so every dtype view on the host stays aligned.
        parts, self._offsets, offset = [], [], 0
        for t in tensors:
            raw = t.reshape(-1).view(torch.uint8)
            pad = -raw.numel() % 8
            parts += [raw, raw.new_zeros(pad)] if pad else [raw]
            self._offsets.append(offset)
            offset += raw.numel() + pad
        packed = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._event = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._device = packed  # nothing in flight: the copy happens in wait()
        self._lock = threading.Lock()
        self._arrays: list[np.ndarray] | None = None

    def wait(self) -> list[np.ndarray]:
        """The tensors as numpy arrays (views of one host buffer); the first call synchronises."""
        with self._lock:
            if self._arrays is None:
                if self._event is not None:
                    self._event.synchronize()
                    buffer = self._host.numpy()
                else:
                    buffer = self._device.cpu().numpy()
                    del self._device
                self._arrays = [
                    buffer[offset : offset + math.prod(shape) * dtype.itemsize]
                    .view(_NUMPY[dtype])
                    .reshape(shape)
                    for (shape, dtype), offset in zip(self._specs, self._offsets, strict=True)
                ]
            return self._arrays


_NUMPY = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float32: np.float32,
}


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


class SyncCount:
    """Device->host synchronisations seen by :func:`counting_syncs`."""

    def __init__(self) -> None:
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self._lock:
            self.count += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


@contextlib.contextmanager
def counting_syncs(emulate_device: bool = False) -> Iterator[SyncCount]:
    """Count the calls that make the host wait for the device, in every thread, while inside.

    Counted: ``.cpu()``, blocking ``.to(cpu)`` from a real device, ``.item()``, ``.tolist()``, ``.numpy()``,
    ``bool`` / ``int`` / ``float`` / ``__index__`` of a tensor,
    ``.nonzero()`` / ``torch.nonzero`` on device tensors, and CUDA stream / event / device
    synchronisation. With ``emulate_device`` a CPU run counts CPU tensors as device tensors, except
    those a counted ``.cpu()`` / ``.to(cpu)`` returned (already host copies), so a CPU run counts what a
    CUDA run would. For benchmarks and tests; not thread-safe to nest.
    """
    counter = SyncCount()
    host_mark = "_pseudolabel_host_copy"

    def on_device(tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu":
            return True
        return emulate_device and not getattr(tensor, host_mark, False)

    def mark(result: Any) -> Any:
        if isinstance(result, torch.Tensor) and result.device.type == "cpu":
            setattr(result, host_mark, True)
        return result

    def reads(name: str, original: Callable) -> Callable:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if on_device(self):
                counter.add(name)
            return original(self, *args, **kwargs)

        return wrapper

    def copies(name: str, original: Callable) -> Callable:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            was_on_device = on_device(self)
            result = original(self, *args, **kwargs)
            to_host = isinstance(result, torch.Tensor) and result.device.type == "cpu"
            # .to(): only a real device change counts (an emulated device cannot tell a CPU "move" from
            # a no-op .to(x.device) or a dtype cast).
            moves = name == "cpu" or self.device.type != "cpu"
            if was_on_device and to_host and moves and not kwargs.get("non_blocking", False):
                counter.add(name)
                mark(result)
            return result

        return wrapper

    def waits(name: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.add(name)
            return original(*args, **kwargs)

        return wrapper

    patches: list[tuple[Any, str, Callable]] = [
        (torch.Tensor, "cpu", copies("cpu", torch.Tensor.cpu)),
        (torch.Tensor, "to", copies("to(cpu)", torch.Tensor.to)),
        *(
            (torch.Tensor, name, reads(name, getattr(torch.Tensor, name)))
            for name in (
                "item",
                "tolist",
                "numpy",
                "__bool__",
                "__int__",
                "__index__",
                "__float__",
                "nonzero",
            )
        ),
        (torch, "nonzero", reads("nonzero", torch.nonzero)),
        (torch.cuda, "synchronize", waits("synchronize", torch.cuda.synchronize)),
        (torch.cuda.Event, "synchronize", waits("event.synchronize", torch.cuda.Event.synchronize)),
        (torch.cuda.Stream, "synchronize", waits("stream.synchronize", torch.cuda.Stream.synchronize)),
    ]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield counter
    finally:
        for owner, name, original in saved:
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


_MISSING = object()
