"""How the models run: device and precision, input decoding and normalisation, seeded init."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils._pytree import tree_map

# Moved to the torch-free domain code (the CPU stages use it too); re-exported for the model code.
from pseudolabel.images.shard import usable_cpus as usable_cpus
from pseudolabel.models.interfaces import PreparedImage

log = logging.getLogger(__name__)

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


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as the current CUDA device while inside (a no-op for other devices and for a bare
    ``cuda``). Whatever a library allocates on "cuda" without an index, pins, or records on "the
    current stream" then lands on ``device`` (cuda:1 with ``--device cuda:1``), not on device 0."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def inference(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast when asked (weights stay fp32), with ``device`` as the
    current device (:func:`device_scope`)."""
    with (
        device_scope(device),
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == BF16),
    ):
        yield


def pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory makes the later host->GPU copy asynchronous; pointless for CPU runs.
    Pinned under ``device``'s context (:func:`device_scope`), so no context is created on device 0."""
    if device.type != "cuda":
        return tensor
    with device_scope(device):
        return tensor.pin_memory()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host synchronisation (pinned + ``non_blocking`` on CUDA:
    a pageable copy would wait for the stream)."""
    return pin(torch.from_numpy(np.ascontiguousarray(array)), device).to(device, non_blocking=True)


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (10-bit mantissa products, fp32
    accumulation); a no-op elsewhere. Process-wide, as torch's flags are: every backend calls it when
    built for CUDA, so a model's numerics never depend on which other model the process loaded."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_HALF = (torch.float16, torch.bfloat16)


def run_in_fp32(module: nn.Module) -> nn.Module:
    """``module`` (a small output head) runs in fp32 even inside autocast: its half-precision inputs are
    cast to fp32 and autocast is off while it runs. Under bf16 autocast a head's outputs would be
    rounded to 8 significant bits (steps of 2^-8 just below 1: predicted IoUs tie, scores and boxes
    move); a head costs nothing next to the trunk. Weights, ``state_dict`` and ``save_pretrained``
    are unchanged; idempotent; a deep copy keeps it."""
    if getattr(module, "_runs_in_fp32", False):
        return module
    forward = type(module).forward

    def fp32_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = tree_map(
            lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in _HALF else x, (args, kwargs)
        )
        weight = next(self.parameters(), None)
        with torch.autocast(weight.device.type if weight is not None else "cpu", enabled=False):
            return forward(self, *args, **kwargs)

    module.forward = types.MethodType(fp32_forward, module)
    module._runs_in_fp32 = True
    return module


class HostCopy:
    """Device tensors copied to host memory with ONE synchronisation point, which can come later.

    On CUDA the copies go into pinned buffers with ``non_blocking=True`` and an event is recorded on
    the stream the copy runs on, the current stream of the tensors' device (cuda:N, whatever the
    current device is); :meth:`wait` (thread-safe, syncs once) blocks on that event only. Several
    tensors travel as one byte buffer, so a CPU run reads them back in one ``.cpu()`` as well.
    ``tensors`` must be contiguous, on one device, of a dtype numpy has (not bf16: cast a bf16 result
    to fp32 on the device first); any shapes. ``then``: host work done once on the arrays after the
    copy (by whichever thread waits first); :meth:`wait` returns its result.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        then: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
    ) -> None:
        unsupported = sorted({str(t.dtype) for t in tensors if t.dtype not in _NUMPY})
        if unsupported:
            raise TypeError(
                f"HostCopy: no numpy dtype for {', '.join(unsupported)} (a bf16 result of autocast? "
                "cast it to float32 on the device first)"
            )
        self._then = then
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
            self._host, self._event = _copy_to_pinned(packed)
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
                arrays = [
                    buffer[offset : offset + math.prod(shape) * dtype.itemsize]
                    .view(_NUMPY[dtype])
                    .reshape(shape)
                    for (shape, dtype), offset in zip(self._specs, self._offsets, strict=True)
                ]
                self._arrays = self._then(arrays) if self._then else arrays
            return self._arrays


def _copy_to_pinned(packed: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(pinned host buffer, event): ``packed`` (a CUDA tensor) copied without blocking, and an event
    recorded after the copy on the stream it runs on: the current stream of ``packed``'s device. An
    event on the current device's stream instead (device 0 while the copy runs on cuda:1) would
    complete before the copy lands, and the host would read a half-written buffer."""
    device = packed.device
    with device_scope(device):  # the pinned buffer under the copy's context, not device 0's
        stream = torch.cuda.current_stream(device)
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        return host, stream.record_event()


_NUMPY = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
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


# ---- JPEG decoding on the model's device (opt-in: DetectorSpec.decode_on_device) --------------------------


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG the CPU workers left compressed; :meth:`ImageDecoding.decoded` turns it into pixels.

    ``data``: (n,) uint8, the file's bytes. ``size``: (w, h) of the model input it is resized to.
    """

    data: torch.Tensor
    size: tuple[int, int]


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8 with (w, h) = ``size``, on the tensor's own device.

    Bilinear with antialiasing (when downscaling the filter widens to the scale factor, as PIL's
    BILINEAR does), computed in fp32 and rounded to the nearest integer.
    """
    width, height = size
    if tuple(pixels.shape[1:]) == (height, width):
        return pixels
    resized = F.interpolate(
        pixels[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )  # (1, 3, h, w) fp32
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


NOT_JPEG, DECODE_ERROR = "not_jpeg", "decode_error"  # why an image took the PIL path (ImageDecoding)

# torchvision's CUDA decoder rethrows every failure as a plain RuntimeError("Error while decoding JPEG
# images: <what>"). Out of memory reads as PyTorch's "CUDA out of memory" (its output tensors), an
# nvJPEG call failing with NVJPEG_STATUS_ALLOCATOR_FAILURE (5; nvJPEG allocates outside PyTorch's
# cache) or a stream sync failing with cudaErrorMemoryAllocation (2).
_OUT_OF_MEMORY = re.compile(
    r"out of memory|Failed to (?!synchronize)[^:]*: 5\b|Failed to synchronize CUDA stream: 2\b", re.I
)


def decoder_out_of_memory(exc: BaseException) -> bool:
    """Whether a decode failure is the device running out of memory (not the data's fault: the stage's
    retry halves the batch) rather than a JPEG the decoder rejects."""
    return isinstance(exc, torch.OutOfMemoryError) or bool(_OUT_OF_MEMORY.search(str(exc)))


def _as_out_of_memory(exc: RuntimeError) -> torch.OutOfMemoryError:
    """``exc`` as the type workers recognise (``OutOfMemoryError``), keeping its message."""
    if isinstance(exc, torch.OutOfMemoryError):
        return exc
    return torch.OutOfMemoryError(f"JPEG decoding on the device ran out of memory: {exc}")


class ImageDecoding:
    """Where a detector's images are decoded and resized.

    ``on_device=False`` (default): :func:`prepare_image` in the CPU workers (PIL, JPEG draft mode).

    ``on_device=True``: the CPU workers only parse the header (PIL reads the size without decoding) and
    keep the bytes (:class:`EncodedJpeg`); :meth:`decoded` then decodes the whole batch in ONE
    ``torchvision.io.decode_jpeg`` call on ``device`` (nvJPEG on CUDA) and resizes each image there
    (:func:`resize_pixels`). Pixels differ slightly from the PIL path (a full decode instead of DCT
    scaling, another resize implementation: see the README), so the setting enters ``describe()``.
    Data that is not an RGB or greyscale JPEG (PNG, CMYK, ...) and JPEGs the decoder rejects take the
    PIL path instead: counted per reason in :attr:`fallbacks`, the first of each reason logged.
    """

    def __init__(self, device: torch.device, on_device: bool = False) -> None:
        self.device = device
        self.on_device = on_device
        self.fallbacks: dict[str, int] = {NOT_JPEG: 0, DECODE_ERROR: 0}
        self._lock = threading.Lock()

    def prepare(self, image_id: str, data: bytes, target: TargetSize) -> PreparedImage:
        """CPU worker side. ``pixels``: (3, h, w) uint8 (PIL path) or an :class:`EncodedJpeg`."""
        if not self.on_device:
            return prepare_image(image_id, data, target, self.device)
        with Image.open(io.BytesIO(data)) as image:  # the header only: no pixel is decoded here
            width, height = image.size
            jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
        if not jpeg:
            self._fell_back(NOT_JPEG, image_id)
            return prepare_image(image_id, data, target, self.device)
        encoded = EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), target(width, height))
        return PreparedImage(image_id, width, height, encoded)

    def decoded(self, batch: Sequence[PreparedImage]) -> list[PreparedImage]:
        """``batch`` with every :class:`EncodedJpeg` replaced by its (3, h, w) uint8 pixels on the device;
        other items unchanged. One decode call for the batch; a failing batch is retried image by image."""
        todo = [i for i, item in enumerate(batch) if isinstance(item.pixels, EncodedJpeg)]
        if not todo:
            return list(batch)
        encoded: list[EncodedJpeg] = [batch[i].pixels for i in todo]
        try:
            images = self._decode_jpegs([e.data for e in encoded])
        except RuntimeError as exc:
            if decoder_out_of_memory(exc):  # not the data's fault: the stage's retry halves the batch
                raise _as_out_of_memory(exc) from exc
            # one bad image fails the whole call: find it
            images = [self._decode_one(batch[i].image_id, e) for i, e in zip(todo, encoded, strict=True)]
        out = list(batch)
        for i, e, image in zip(todo, encoded, images, strict=True):
            out[i] = replace(batch[i], pixels=resize_pixels(image.to(self.device, non_blocking=True), e.size))
        return out

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """(n_i,) uint8 file bytes -> (3, H_i, W_i) uint8 full-size RGB images on the device."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # torchvision's CUDA decoder writes its outputs from a private stream that is not ordered after
            # the caller's (pytorch/vision#9606, torchcodec#1634): memory the caching allocator recycled
            # could still be read by queued kernels. Wait on the host for the current stream first; the
            # detectors' previous batch already ended with a host copy, so this costs ~nothing.
            torch.cuda.current_stream(self.device).synchronize()
        with device_scope(self.device), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def _decode_one(self, image_id: str, encoded: EncodedJpeg) -> torch.Tensor:
        """(3, H, W) uint8: one image decoded on the device or, when the decoder rejects it, PIL's decode +
        resize on the host (already at the target size, so :func:`resize_pixels` leaves it as it is)."""
        try:
            return self._decode_jpegs([encoded.data])[0]
        except RuntimeError as exc:
            if decoder_out_of_memory(exc):
                raise _as_out_of_memory(exc) from exc
            self._fell_back(DECODE_ERROR, image_id)
        data = encoded.data.numpy().tobytes()
        try:
            return prepare_image(image_id, data, lambda w, h: encoded.size, self.device).pixels
        except OSError as exc:  # PIL cannot read it either: fail as the CPU path would, naming the image
            raise RuntimeError(f"image {image_id}: {exc}") from exc

    def _fell_back(self, reason: str, image_id: str) -> None:
        with self._lock:
            self.fallbacks[reason] += 1
            first = self.fallbacks[reason] == 1
        if first:
            log.warning(
                "image %s: %s, decoded with PIL on the CPU instead of on %s (further ones are only counted)",
                image_id,
                "not an RGB/greyscale JPEG" if reason == NOT_JPEG else "the JPEG decoder rejected it",
                self.device,
            )


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
    """Synchronisations seen by :func:`counting_syncs`: device->host reads, waits, blocking host->device
    copies."""

    def __init__(self) -> None:
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, kind: str) -> None:
        with self._lock:
            self.count += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


H2D = "to(device)"  # SyncCount kind of a blocking host->device copy


@contextlib.contextmanager
def counting_syncs(emulate_device: bool = False) -> Iterator[SyncCount]:
    """Count the calls that make the host wait for the device, in every thread, while inside.

    Counted: ``.cpu()``, blocking ``.to(cpu)`` from a real device, ``.item()``, ``.tolist()``, ``.numpy()``,
    ``bool`` / ``int`` / ``float`` / ``__index__`` of a tensor, a blocking ``copy_`` into host memory from a
    real device, ``.nonzero()`` / ``torch.nonzero`` on device tensors, CUDA stream / event / device
    synchronisation, and (kind :data:`H2D`) host->device copies that block: PyTorch waits for the
    stream after a copy from pageable memory or without ``non_blocking`` (``.to(device)``, ``.cuda()``,
    ``copy_``), and ``torch.tensor`` / ``torch.as_tensor`` of host data with a ``device`` make one.
    With ``emulate_device`` a CPU run counts CPU tensors as device tensors, except
    those a counted ``.cpu()`` / ``.to(cpu)`` returned (already host copies), and ``torch.tensor`` /
    ``torch.as_tensor`` with any ``device`` as host->device copies, so a CPU run counts what a CUDA
    run would, but for ``.to(device)`` / ``copy_`` (a CPU "device" cannot tell them from no-ops).
    For benchmarks and tests; not thread-safe to nest.
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

    def uploads(source: torch.Tensor, target: Any, non_blocking: bool) -> bool:
        """Whether copying ``source`` into ``target`` is a blocking host->device copy on a real device."""
        if not (isinstance(target, torch.Tensor) and target.device.type != "cpu"):
            return False
        return source.device.type == "cpu" and not (non_blocking and source.is_pinned())

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
            non_blocking = bool(kwargs.get("non_blocking", False))
            to_host = isinstance(result, torch.Tensor) and result.device.type == "cpu"
            # .to(): only a real device change counts (an emulated device cannot tell a CPU "move" from
            # a no-op .to(x.device) or a dtype cast).
            moves = name == "cpu" or self.device.type != "cpu"
            if was_on_device and to_host and moves and not non_blocking:
                counter.add(name)
                mark(result)
            elif uploads(self, result, non_blocking):
                counter.add(H2D)
            return result

        return wrapper

    def copies_into(original: Callable) -> Callable:
        def wrapper(self: torch.Tensor, source: Any, non_blocking: bool = False, **kwargs: Any) -> Any:
            if isinstance(source, torch.Tensor):
                if uploads(source, self, non_blocking):
                    counter.add(H2D)
                elif source.device.type != "cpu" and self.device.type == "cpu" and not non_blocking:
                    counter.add("copy_(cpu)")
            return original(self, source, non_blocking, **kwargs)

        return wrapper

    def creates(original: Callable) -> Callable:
        def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
            device = kwargs.get("device")
            from_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
            if device is not None and from_host and (emulate_device or torch.device(device).type != "cpu"):
                counter.add(H2D)
            return original(data, *args, **kwargs)

        return wrapper

    def waits(name: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter.add(name)
            return original(*args, **kwargs)

        return wrapper

    patches: list[tuple[Any, str, Callable]] = [
        (torch.Tensor, "cpu", copies("cpu", torch.Tensor.cpu)),
        (torch.Tensor, "to", copies("to(cpu)", torch.Tensor.to)),
        (torch.Tensor, "cuda", copies("cuda", torch.Tensor.cuda)),
        (torch.Tensor, "copy_", copies_into(torch.Tensor.copy_)),
        (torch, "tensor", creates(torch.tensor)),
        (torch, "as_tensor", creates(torch.as_tensor)),
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
