"""Batched SAM2 box-prompted segmentation, with masks encoded to COCO RLE on the device.

``SAM2ImagePredictor`` embeds one image per call (or a list through ``set_image_batch``, whose
feature sizes are hard-wired to 1024 px inputs) and returns float32 masks at full resolution on the
host: ~480 MB for a 12 MP image with 10 boxes. :class:`Sam2Segmenter` instead

    encodes a batch of images         (B, 3, S, S) -> image embeddings (B, 256, S/16, S/16) + 2 high-res levels
    decodes per image, all boxes at once  (N, 4) boxes -> low-res logits (N, K, S/4, S/4), IoU (N, K)
    upsamples on the device in chunks  -> (n, H, W) bool -> run boundaries -> RLE on the host

so only RLE-sized data leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointSpec
from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import SegmenterSpec, spec_checkpoint, spec_identity, spec_runtime
from pseudolabel.models.runtime import FP32, describe_runtime, inference, normalization, prepare_image, seeded
from pseudolabel.rle import EncodedMasks, encode_device_masks

_RELEASES = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class Sam2Variant:
    config_file: str  # hydra config name inside the sam2 package
    checkpoint: CheckpointSpec


def _variant(name: str, letter: str) -> Sam2Variant:
    filename = f"sam2.1_hiera_{name}.pt"
    # Digests not pinned: no reliable published source; recorded on first download (checkpoints.py).
    return Sam2Variant(
        f"configs/sam2.1/sam2.1_hiera_{letter}.yaml",
        CheckpointSpec(f"SAM2.1 hiera_{name}", filename, f"{_RELEASES}/{filename}", None),
    )


VARIANTS: dict[str, Sam2Variant] = {
    "tiny": _variant("tiny", "t"),
    "small": _variant("small", "s"),
    "base_plus": _variant("base_plus", "b+"),
    "large": _variant("large", "l"),
}
DEFAULT_VARIANT = "large"


def build_sam2_model(
    variant: str = DEFAULT_VARIANT,
    checkpoint: Path | None = None,
    *,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> nn.Module:
    """Build a SAM2.1 model on the CPU; load ``checkpoint`` or keep a seeded random init.

    ``overrides`` are hydra overrides (see :func:`pseudolabel.models.tiny.tiny_sam2_overrides`).
    The stock post-processing settings of ``build_sam2`` (dynamic multimask fallback) are kept.
    """
    from sam2.build_sam import build_sam2

    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM2 variant {variant!r}; expected one of {sorted(VARIANTS)}")
    with seeded(seed):
        return build_sam2(
            VARIANTS[variant].config_file,
            str(checkpoint) if checkpoint else None,
            device="cpu",
            hydra_overrides_extra=list(overrides),
        )


def load_sam2(spec: SegmenterSpec) -> Sam2Segmenter:
    """The segmenter ``spec`` describes: checkpoint fetched and verified, model built and placed."""
    resolved = spec_checkpoint(spec, VARIANTS[spec.variant].checkpoint)
    device, precision = spec_runtime(spec, resolved)
    size = spec.image_size or (tiny.TINY_SAM2_IMAGE_SIZE if spec.tiny else None)
    overrides = tiny.tiny_sam2_overrides(size) if spec.tiny else []
    if spec.image_size and not spec.tiny:
        overrides.append(f"++model.image_size={spec.image_size}")
    model = build_sam2_model(spec.variant, resolved.path, overrides=overrides, seed=spec.seed)
    info = {
        "model": "sam2.1",
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        **spec_identity(spec, resolved),
    }
    return Sam2Segmenter(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        max_boxes_per_call=spec.max_boxes_per_call,
        info=info,
    )


class Sam2Segmenter:
    """Segments box prompts with a SAM2 model, a batch of images at a time.

    Arguments:
      model: a built ``SAM2Base`` (see :func:`build_sam2_model`); its ``image_size`` S sets the input size.
      device, precision: where and how to run (precision "bf16" = autocast, weights stay fp32).
      batch_size: images per image-encoder pass.
      max_boxes_per_call: boxes per mask-decoder call (all boxes of an image up to this many).
      chunk_pixels: cap on masks x H x W upsampled at once on the device (bounds device memory
        for 12 MP images with many boxes).
      info: identity for metadata (variant, checkpoint sha256, ...), returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        precision: str = FP32,
        batch_size: int = 8,
        max_boxes_per_call: int = 64,
        chunk_pixels: int = 1 << 27,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = int(model.image_size)
        self.max_boxes_per_call = max_boxes_per_call
        self.chunk_pixels = chunk_pixels
        self._info = dict(info or {})
        self._scale, self._shift = normalization(device)

    def describe(self) -> dict[str, Any]:
        return describe_runtime(
            self._info, self.device, self.precision, self.batch_size, f"{self.image_size}x{self.image_size}"
        )

    # ---- CPU side (background workers) ---------------------------------------------------------

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + resize one JPEG to S x S (SAM2 stretches, it does not pad). ``pixels``: (3, S, S) uint8."""
        size = self.image_size
        return prepare_image(image_id, data, lambda w, h: (size, size), self.device)

    # ---- accelerator side --------------------------------------------------------------------------

    def segment(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool = False
    ) -> list[Candidates]:
        """``candidates[i]`` with one mask per box; their boxes: (N_i, 4) xyxy in original pixels of ``batch[i]``.

        With ``multimask`` SAM2 returns 3 masks per box and the highest predicted IoU is kept; without,
        1 mask (SAM2's own stability fallback may still pick among its 3 internally).
        """
        if len(batch) != len(candidates):
            raise ValueError(f"{len(batch)} images but {len(candidates)} candidate sets")
        if not batch:
            return []
        with inference(self.device, self.precision):
            embeddings, high_res = self._encode(batch)
            return [
                self._segment_one(item, found, i, embeddings, high_res, multimask)
                for i, (item, found) in enumerate(zip(batch, candidates, strict=True))
            ]

    def _encode(self, batch: Sequence[PreparedImage]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image encoder on the whole batch: embeddings (B, C, S/16, S/16), high-res [(B, C0, S/4, S/4), (B, C1, S/8, S/8)]."""
        # Copy each pinned tensor on its own: stacking on the host would make a pageable (synchronous) copy.
        pixels = torch.stack([item.pixels.to(self.device, non_blocking=True) for item in batch])
        images = pixels.float() * self._scale - self._shift
        model = self.model
        backbone_out = model.forward_image(images)
        _, features, _, sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:  # as SAM2ImagePredictor does for single images
            features[-1] = features[-1] + model.no_mem_embed
        # (HW, B, C) -> (B, C, H, W), finest level first
        maps = [
            f.permute(1, 2, 0).reshape(len(batch), -1, h, w)
            for f, (h, w) in zip(features, sizes, strict=True)
        ]
        return maps[-1], maps[:-1]

    def _segment_one(
        self,
        item: PreparedImage,
        found: Candidates,
        index: int,
        embeddings: torch.Tensor,
        high_res: list[torch.Tensor],
        multimask: bool,
    ) -> Candidates:
        outputs = 3 if multimask else 1
        if len(found) == 0:
            return found.with_no_masks(outputs)
        boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
        logits, scores = [], []
        for start in range(0, len(boxes), self.max_boxes_per_call):
            chunk_logits, chunk_scores = self._decode(
                boxes[start : start + self.max_boxes_per_call], item, index, embeddings, high_res, multimask
            )
            logits.append(chunk_logits)
            scores.append(chunk_scores)
        low_res = torch.cat(logits)  # (N, K, S/4, S/4)
        iou = torch.cat(scores).float()  # (N, K)
        chosen = iou.argmax(dim=1)
        picked = low_res[torch.arange(len(boxes), device=low_res.device), chosen].float()  # (N, S/4, S/4)
        encoded = self._binarize_and_encode(picked, item.height, item.width)
        iou_host = iou.cpu().numpy().astype(np.float32)
        chosen_host = chosen.cpu().numpy()
        return found.with_masks(
            encoded,
            mask_scores=iou_host[np.arange(len(boxes)), chosen_host],
            multimask_index=chosen_host.astype(np.int8),
            multimask_scores=iou_host.reshape(len(boxes), outputs),
        )

    def _decode(
        self,
        boxes: np.ndarray,
        item: PreparedImage,
        index: int,
        embeddings: torch.Tensor,
        high_res: list[torch.Tensor],
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for (n, 4) boxes of image ``index``: logits (n, K, S/4, S/4), IoU (n, K)."""
        model = self.model
        # Original pixels -> model input frame (the image was stretched to S x S).
        scale = torch.tensor(
            [self.image_size / item.width, self.image_size / item.height], device=self.device
        )
        corners = (
            torch.tensor(boxes, dtype=torch.float32, device=self.device).view(-1, 2, 2) * scale
        )  # (n, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).expand(
            len(boxes), 2
        )  # box corners
        sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=embeddings[index : index + 1],
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=len(boxes) > 1,
            high_res_features=[level[index : index + 1] for level in high_res],
        )
        return low_res, iou

    def _binarize_and_encode(self, low_res: torch.Tensor, height: int, width: int) -> EncodedMasks:
        """(N, s, s) fp32 logits -> bilinear to (H, W) -> > 0 on the device, a chunk of masks at a time -> RLE."""
        per_chunk = max(1, self.chunk_pixels // (height * width))
        parts = []
        for start in range(0, low_res.shape[0], per_chunk):
            upsampled = F.interpolate(
                low_res[start : start + per_chunk, None],
                (height, width),
                mode="bilinear",
                align_corners=False,
            )
            parts.append(encode_device_masks(upsampled[:, 0] > 0))
            del upsampled
        return EncodedMasks.concat(parts, height, width)
