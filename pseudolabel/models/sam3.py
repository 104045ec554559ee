"""SAM 3 (Meta, Nov 2025) through transformers >= 5: every instance of a noun phrase, box + mask, in one pass.

SAM 3 does promptable concept segmentation: given an image and ONE short noun phrase ("potted plant"),
its DETR-style detector returns Q = 200 instance queries, each with a box, a mask and a score, plus one
presence score for the phrase in the whole image. It lives in its own worker environment (the
``worker-sam3`` extra: transformers >= 5, which Grounding DINO cannot run on) and its own image
(deploy/Dockerfile.worker-sam3).

:class:`Sam3Detector` (the ``Detector`` protocol) runs a batch of B images against the P phrases of the
captions (``"plant . flower ."`` -> "plant", "flower"; each phrase is one prompt, as SAM 3 takes one
text per image-text pair):

    get_vision_features   ViT + FPN, ONCE per image batch                     -> multi-scale (B, 256, ., .)
    forward (per phrase)  text tower + DETR encoder/decoder + mask decoder on the batch's features
                                                                              -> logits (B, Q), presence (B, 1),
                                                                                 boxes (B, Q, 4), masks (B, Q, h, w)

The text tower runs for each image-phrase pair (SAM 3's forward takes one text per pair); its cost is
well under 1 % of the vision encoder's. Images are stretched to S x S (S = 1008 released; no aspect
preservation, as Sam3Processor does) on the CPU and normalised on the device with the processor's mean
and std; boxes and masks are mapped back to ORIGINAL image pixels (boxes clipped to the image: SAM 3's
may cross its border).

Scores kept per instance (query q of phrase p on image b), so any threshold above the floors can be applied
later without the GPU:

    box_score    the detection score exactly as ``Sam3Processor.post_process_instance_segmentation`` computes
                 it: sigmoid(pred_logits[b, q]) * sigmoid(presence_logits[b]), presence included.
    text_score   the presence score sigmoid(presence_logits[b]) of the phrase in the image: "is there any
                 <phrase> here", the same for every instance of that phrase in that image. box_score <=
                 text_score always, so a text threshold drops whole phrases per image.
    phrase       the noun phrase.
    query_index  p * Q + q: unique per image; candidates are returned sorted by box score, ties by query index.
    mask         sigmoid(pred_masks) resized bilinearly to the original size, > 0.5 (the post-processing's
                 rule), as COCO RLE (``Candidates.with_masks``).
    mask_score   = box_score: SAM 3's image model has no mask-quality (predicted IoU) head, so the instance's
                 detection score stands for its mask too. One mask per instance: multimask does not
                 apply (K = 1, multimask_scores = (N, 1) of mask_score).

Kept: ``box_score > box_floor`` and ``text_score > text_floor``, the best ``max_candidates`` per image over
all phrases.

The masks stage keeps these masks with the segmenter backend ``"detector"`` (:class:`DetectorMasks`, no
model): the detections stage stores them (``detections/<shard>.masks.parquet``), the masks stage copies
them. This module imports torch and transformers only inside the SAM 3 code, so that backend runs on the
orchestrator's interpreter.

Weights: facebook/sam3 on the Hugging Face hub, gated under the SAM License (Meta, last updated
2025-11-19): a non-exclusive, worldwide, royalty-free licence to use, reproduce, distribute and modify,
commercial use included; redistributions must carry the licence; publications must acknowledge SAM;
uses subject to trade controls and excluding military/warfare, nuclear, espionage and weapons end uses
(section 1.b.v); no reverse engineering. Accept it on the hub, then set HF_TOKEN for the worker.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pseudolabel.models.checkpoints import HubModel, ResolvedCheckpoint, resolve_pretrained_dir
from pseudolabel.models.interfaces import Candidates, PreparedImage, normalize_caption, phrases_of
from pseudolabel.models.loading import (
    DETECTOR_MASKS,
    SAM3,
    DetectorSpec,
    ModelConfigError,
    SegmenterSpec,
    spec_identity,
    spec_runtime,
)
from pseudolabel.rle import EncodedMasks

if TYPE_CHECKING:
    import torch

# The revision both public byte-identical mirrors of the release record (not checkable from here).
SAM3_HUB = HubModel("SAM 3", "facebook/sam3", "3c879f39826c281e95690f02c7821c4de09afae7", gated=True)
MASK_THRESHOLD = 0.5  # on the mask probability, as Sam3Processor's post-processing
TEXT_LENGTH = 32  # tokens per phrase: Sam3Processor pads every phrase to 32 (the text tower's positions)
SAM3_MEAN = SAM3_STD = (0.5, 0.5, 0.5)  # Sam3ImageProcessor's normalisation (random weights use it too)
MASK_CHUNK = 16  # masks resized + encoded at once (bounds device memory at full image size)


def load_sam3(spec: DetectorSpec) -> Sam3Detector:
    """The SAM 3 detector ``spec`` describes: ``checkpoint`` "" = facebook/sam3 at the pinned revision
    (HF_TOKEN: the weights are gated), a local ``save_pretrained`` directory (model + processor), an
    ``s3://`` prefix holding one, or "random" (``tiny``: :func:`pseudolabel.models.tiny.tiny_sam3_config`;
    else the released architecture; both with a generated tokenizer, no downloads)."""
    resolved = resolve_pretrained_dir(
        spec.checkpoint, SAM3_HUB, cache_dir=spec.cache(), allow_download=spec.allow_download
    )
    device, precision = spec_runtime(spec, resolved)
    model, tokenizer, image_size, mean, std = _build(spec, resolved)
    info = {
        "model": SAM3,
        "variant": "sam3-tiny" if spec.tiny else "sam3",
        **spec_identity(spec, resolved),
        "mask_threshold": MASK_THRESHOLD,
    }
    return Sam3Detector(
        model,
        tokenizer,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        image_size=image_size,
        mean=mean,
        std=std,
        info=info,
    )


def _build(spec: DetectorSpec, resolved: ResolvedCheckpoint) -> tuple[Any, Any, int, tuple, tuple]:
    """(model on the CPU, tokenizer, input size S, mean, std) of a checkpoint directory or random weights."""
    import torch
    from transformers import Sam3Config, Sam3Model, Sam3Processor

    from pseudolabel.models import tiny
    from pseudolabel.models.runtime import seeded

    if resolved.path is None:  # random weights: nothing is read from disk or the network
        tokenizer = tiny.sam3_tokenizer()
        config = tiny.tiny_sam3_config(len(tokenizer)) if spec.tiny else Sam3Config()
        if spec.image_size and spec.image_size != config.image_size:
            raise ModelConfigError(
                f"SAM 3 random weights run at {config.image_size} px, not {spec.image_size}"
            )
        with seeded(spec.seed):
            model = Sam3Model(config)
        return model.eval(), tokenizer, config.image_size, SAM3_MEAN, SAM3_STD
    processor = Sam3Processor.from_pretrained(resolved.path)
    # fp32 weights whatever the files hold: precision "bf16" is autocast (see pseudolabel.models.runtime).
    model = Sam3Model.from_pretrained(resolved.path, dtype=torch.float32).eval()
    size = processor.image_processor.size
    image_size = int(size["height"])
    if int(size["width"]) != image_size or image_size != model.config.image_size:
        raise ModelConfigError(
            f"{resolved.source}: processor size {dict(size)} does not match the model's {model.config.image_size}"
        )
    if spec.image_size and spec.image_size != image_size:
        raise ModelConfigError(
            f"SAM 3 runs at the input size it was trained at ({image_size} px); unset image_size"
        )
    processor_mean = tuple(float(v) for v in processor.image_processor.image_mean)
    processor_std = tuple(float(v) for v in processor.image_processor.image_std)
    return model, processor.tokenizer, image_size, processor_mean, processor_std


def fetch_sam3(cache_dir: str = "") -> Path:
    """Download (once) facebook/sam3 at the pinned revision into the Hugging Face cache (HF_TOKEN of an
    account that accepted the SAM License); e.g. to bake it into the worker-sam3 image."""
    resolved = resolve_pretrained_dir("", SAM3_HUB, cache_dir=cache_dir or None)
    assert resolved.path is not None
    return resolved.path


class Sam3Detector:
    """Runs a ``transformers.Sam3Model`` on batches of images against noun phrases (see the module doc).

    Arguments:
      model: a ``Sam3Model`` (from ``from_pretrained`` or a config); tokenizer: its CLIP tokenizer.
      device, precision: where and how to run (precision "bf16" = autocast, weights stay fp32).
      batch_size: images per vision-encoder pass.
      image_size: S, the square model input; mean, std: the processor's normalisation (0..1 units).
      info: identity for metadata and fingerprints, returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        precision: str,
        batch_size: int = 8,
        image_size: int = 1008,
        mean: Sequence[float] = SAM3_MEAN,
        std: Sequence[float] = SAM3_STD,
        info: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from pseudolabel.models.runtime import enable_tf32

        enable_tf32(device)
        self.model = model.to(device).eval()
        fp32_heads(self.model)
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = image_size
        self._info = dict(info or {})
        # (x / 255 - mean) / std as one affine map of the uint8 input: x * scale - shift, each (3, 1, 1).
        std_t = torch.tensor(std, device=device).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(mean, device=device).view(3, 1, 1) / std_t
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        from pseudolabel.models.runtime import describe_runtime

        size = f"{self.image_size}x{self.image_size}"
        return describe_runtime(self._info, self.device, self.precision, self.batch_size, size)

    # ---- CPU side (background workers) ---------------------------------------------------------

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + stretch one JPEG to S x S. ``pixels``: (3, S, S) uint8, pinned when running on CUDA."""
        from pseudolabel.models.runtime import prepare_image

        size = self.image_size
        return prepare_image(image_id, data, lambda w, h: (size, size), self.device)

    # ---- accelerator side --------------------------------------------------------------------------

    def phrase_tokens(self, phrase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (1, 32) on the device: SAM 3's text input; cached."""
        if phrase not in self._tokens:
            encoded = self.tokenizer(
                [phrase],
                padding="max_length",
                max_length=TEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            )
            self._tokens[phrase] = (
                encoded["input_ids"].to(self.device),
                encoded["attention_mask"].to(self.device),
            )
        return self._tokens[phrase]

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str],
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        """Instances with ``box_score > box_floor`` and ``text_score > text_floor`` of every phrase of the
        captions, per image sorted by box score (ties: query index), at most ``max_candidates``, each with
        its mask at the original image size."""
        import torch

        from pseudolabel.models.runtime import HostCopy, inference, to_device

        if not batch:
            return []
        phrases = list(
            dict.fromkeys(p for caption in captions for p in phrases_of(normalize_caption(caption)))
        )
        # Per image: kept (score, presence, box, query index, phrase) rows and their low-res mask logits.
        kept: list[list[tuple[np.ndarray, ...]]] = [[] for _ in batch]
        low_res: list[list[torch.Tensor]] = [[] for _ in batch]
        with inference(self.device, self.precision):
            # Each pinned tensor copied on its own: stacking on the host would make a pageable, blocking copy.
            pixels = torch.stack([item.pixels.to(self.device, non_blocking=True) for item in batch])
            vision = self.model.get_vision_features(pixel_values=pixels.float() * self._scale - self._shift)
            for p, phrase in enumerate(phrases):
                input_ids, attention_mask = self.phrase_tokens(phrase)
                out = self.model(
                    vision_embeds=vision,
                    input_ids=input_ids.expand(len(batch), -1),
                    attention_mask=attention_mask.expand(len(batch), -1),
                )
                presence = out.presence_logits.float().sigmoid()  # (B, 1)
                scores = out.pred_logits.float().sigmoid() * presence  # (B, Q)
                queries = scores.shape[1]
                # One host copy per phrase; only the kept queries' masks stay on the device.
                host_scores, host_presence, host_boxes = HostCopy(
                    [scores.contiguous(), presence.contiguous(), out.pred_boxes.float().contiguous()]
                ).wait()
                for b in range(len(batch)):
                    keep = np.flatnonzero((host_scores[b] > box_floor) & (host_presence[b, 0] > text_floor))
                    keep = keep[np.argsort(-host_scores[b, keep], kind="stable")][:max_candidates]
                    if not len(keep):
                        continue
                    kept[b].append(
                        (
                            host_scores[b, keep],
                            np.full(len(keep), host_presence[b, 0], np.float32),
                            host_boxes[b, keep],
                            (p * queries + keep).astype(np.int32),
                            np.full(len(keep), p, np.int32),
                        )
                    )
                    low_res[b].append(out.pred_masks[b, to_device(keep, self.device)])
            return [
                self._candidates(item, parts, masks, phrases, max_candidates)
                for item, parts, masks in zip(batch, kept, low_res, strict=True)
            ]

    def _candidates(
        self,
        item: PreparedImage,
        parts: list[tuple[np.ndarray, ...]],
        low_res: list[torch.Tensor],
        phrases: list[str],
        max_candidates: int,
    ) -> Candidates:
        """One image's kept instances of every phrase -> the best ``max_candidates``, boxes and masks in
        original pixels."""
        import torch

        from pseudolabel.models.runtime import to_device

        if not parts:
            return Candidates.empty(item.image_id, item.width, item.height).with_no_masks(1)
        scores, presence, boxes, query_indices, phrase_ids = (
            np.concatenate(c) for c in zip(*parts, strict=True)
        )
        order = np.lexsort((query_indices, -scores))[:max_candidates]
        scale = np.array([item.width, item.height, item.width, item.height], np.float32)
        pixel_boxes = np.clip(boxes[order] * scale, 0, scale).astype(np.float32)
        found = Candidates(
            item.image_id,
            item.width,
            item.height,
            pixel_boxes,
            scores[order].astype(np.float32),
            presence[order],
            [phrases[i] for i in phrase_ids[order]],
            query_indices[order],
        )
        logits = torch.cat(low_res)[to_device(order, self.device)]
        masks = EncodedMasks.concat(
            [
                self._encode(logits[i : i + MASK_CHUNK], item.height, item.width)
                for i in range(0, len(order), MASK_CHUNK)
            ],
            item.height,
            item.width,
        )
        n = len(found)
        return found.with_masks(masks, found.box_scores, np.zeros(n, np.int8), found.box_scores.reshape(n, 1))

    @staticmethod
    def _encode(logits: torch.Tensor, height: int, width: int) -> EncodedMasks:
        """(n, h, w) mask logits -> probabilities resized to (height, width), > 0.5, as COCO RLE."""
        import torch.nn.functional as F

        from pseudolabel.rle import encode_device_masks

        probabilities = F.interpolate(
            logits.float().sigmoid().unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False
        ).squeeze(0)
        return encode_device_masks(probabilities > MASK_THRESHOLD)


def fp32_heads(model: Any) -> None:
    """SAM 3's score, box and presence heads in fp32 under bf16 autocast (``runtime.run_in_fp32``), as
    Grounding DINO and OWL keep theirs: in bf16 their logits and box offsets round to 8 significant
    bits (a logit of 2 to steps of 1/64) before the sigmoids."""
    from pseudolabel.models.runtime import run_in_fp32

    run_in_fp32(model.dot_product_scoring)
    run_in_fp32(model.detr_decoder.box_head)
    run_in_fp32(model.detr_decoder.presence_head)


# ---- segmenter backend "detector": the detector's own masks ------------------------------------------


class DetectorMasks:
    """Segmenter backend ``"detector"``: no model, the masks the detector made with its boxes (SAM 3).

    The masks stage copies the detections stage's stored masks (``detections/<shard>.masks.parquet``,
    see :func:`pseudolabel.workers.shards.segment_shard`); in memory, :meth:`segment` passes candidates
    that carry masks through. Either way it fails clearly after a detector that makes no masks.
    """

    from_detections = True  # the masks stage reads the detections stage's masks instead of segmenting
    batch_size = 64

    def __init__(self, spec: SegmenterSpec) -> None:
        self._info = {"backend": DETECTOR_MASKS, "model": "the detector's masks", "weights": "none"}

    def describe(self) -> dict[str, Any]:
        return dict(self._info)

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """The image's size only (its header is read, its pixels are not needed)."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return PreparedImage(image_id, width, height, None)

    def segment(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool
    ) -> list[Candidates]:
        """``candidates`` as they are: they must carry the detector's masks."""
        for found in candidates:
            if found.masks is None:
                raise ModelConfigError(no_masks_message(f"image {found.image_id}'s candidates carry none"))
        return list(candidates)


def no_masks_message(why: str) -> str:
    return (
        f"segmenter backend 'detector' needs a detector that makes masks, e.g. sam3 ({why}); "
        "choose such a detector and re-run detections, or another segmenter backend"
    )


def load_detector_masks(spec: SegmenterSpec) -> DetectorMasks:
    return DetectorMasks(spec)
