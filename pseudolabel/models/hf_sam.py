"""EdgeTAM through transformers: a light SAM2-style segmenter for machines without a big GPU.

EdgeTAM (Zhou et al., 2025) keeps SAM 2's prompt encoder and mask decoder and replaces the Hiera image
encoder by a RepViT-M1 (timm): 9.1 M parameters against 38.9 M for SAM 2.1 hiera-tiny, same 1024 px
input and the same outputs (3 masks + predicted IoU per prompt). ``bench/light_segmenter.py`` measures
both on this machine's CPU. :class:`HfSamSegmenter` drives ``transformers.EdgeTamModel``, per batch of
B images with N prompts in all (S = input size, s = S/4, H x W = each image's original size):

    encode   (B, 3, S, S) uint8, stretched like SAM2 -> ``get_image_embeddings``: one embedding per image,
             [(B, 32, s, s), (B, 64, s/2, s/2), (B, 256, S/16, S/16)]
    decode   per image, its prompts in one ``EdgeTamModel`` call per prompt layout (one call when they
             all have the same kind, the usual case; ``max_boxes_per_call`` at most), reading that
             image's embedding: logits (n, K, s, s), IoU (n, K) -> best of K
    masks    bilinear from s x s straight to H x W (as ``SAM2ImagePredictor``; transformers'
             ``post_process_masks`` goes through S x S first) inside each mask's positive bound only
             (:mod:`mask_upsample`), logits > 0, COCO RLE (:func:`rle.encode_crop_changes`)

Prompts (:func:`prompts.prompt_groups`): a candidate's box (``Candidates.box_prompts()``) as
``input_boxes``, its clicks as ``input_points`` / ``input_labels`` (1 object, 0 background, padding
dropped), in original pixels scaled to S x S. transformers' prompt encoder then makes the same tokens as
SAM2's predictor: the clicks, the two box corners and one padding token (clicks only: the clicks and
one padding token). Grouping by layout keeps every prompt free of extra padding tokens, so a
candidate's mask does not depend on what else is in the batch.

Scores: ``mask_scores`` = the decoder's predicted IoU of the kept mask; ``multimask_scores`` = all K
(K = 3 with ``multimask``, the highest kept; else 1, after the decoder's own stability fallback);
``box_scores`` / ``text_scores`` stay the detector's. Random weights ("random", ``tiny``) are smoke runs:
their masks and scores mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pseudolabel.models import tiny as tiny_configs
from pseudolabel.models.checkpoints import HubModel, ResolvedCheckpoint, resolve_pretrained_dir
from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import ModelConfigError, SegmenterSpec, spec_identity, spec_runtime
from pseudolabel.models.mask_upsample import (
    crop_boxes,
    default_bucket_cost,
    plan_crops,
    planned_changes,
    positive_bounds,
)
from pseudolabel.models.prompts import prompt_groups
from pseudolabel.models.runtime import (
    AUTO,
    FP32,
    HostCopy,
    describe_runtime,
    enable_tf32,
    inference,
    normalization,
    prepare_image,
    run_in_fp32,
    seeded,
    to_device,
)
from pseudolabel.rle import encode_crop_changes

# transformers' own EdgeTAM conversion (its tests load it). Revision: the commit seen in a public
# Hugging Face cache path (models--yonigozlan--EdgeTAM-hf/snapshots/<commit>); not checkable from here.
EDGETAM = HubModel("EdgeTAM", "yonigozlan/EdgeTAM-hf", "c266ce53b3fc00f0f495b583f6a116c4e57f53bb")


_DEFAULT_BACKBONE = "timm/repvit_m1.dist_in1k"  # EdgeTamVisionConfig's default backbone: a hub config id


def _local_default_backbone() -> None:
    """Let EdgeTAM configs be built without the network.

    transformers 4.57 builds a default ``EdgeTamVisionConfig()`` whenever an EdgeTAM config is printed,
    diffed or saved -- and ``from_pretrained`` prints it (``logger.info(f"Model config {config}")``).
    That default reads the backbone's config.json from the hub (``timm/repvit_m1.dist_in1k``), so a
    worker without internet could not load even a local or s3:// checkpoint. This answers that one
    lookup locally with the same architecture (a config, no weights); every other id passes through.
    """
    from transformers import TimmWrapperConfig
    from transformers.models.edgetam import configuration_edgetam

    hub_config = configuration_edgetam.AutoConfig
    if getattr(hub_config, "local_default_backbone", False):
        return

    class LocalDefaultBackbone(hub_config):
        local_default_backbone = True

        @classmethod
        def from_pretrained(cls, name: str, *args: Any, **kwargs: Any) -> Any:
            if name == _DEFAULT_BACKBONE and not args and set(kwargs) <= {"model_args"}:
                return TimmWrapperConfig(architecture=_DEFAULT_BACKBONE.split("/")[1], **kwargs)
            return hub_config.from_pretrained(name, *args, **kwargs)

    configuration_edgetam.AutoConfig = LocalDefaultBackbone


def edgetam_config():
    """The released EdgeTAM architecture (transformers' defaults), its RepViT-M1 backbone built by timm
    without pretrained weights: random full-size weights need no download."""
    from transformers import EdgeTamConfig, EdgeTamVisionConfig, TimmWrapperConfig

    backbone = TimmWrapperConfig(
        architecture="repvit_m1.dist_in1k",
        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
    )
    return EdgeTamConfig(vision_config=EdgeTamVisionConfig(backbone_config=backbone))


def build_edgetam(resolved: ResolvedCheckpoint, *, tiny: bool = False, seed: int = 0) -> nn.Module:
    """``EdgeTamModel`` from a ``from_pretrained`` directory, or random weights (``tiny``: the tiny config)."""
    from transformers import EdgeTamModel

    _local_default_backbone()
    if resolved.path is not None:
        return EdgeTamModel.from_pretrained(resolved.path)
    config = tiny_configs.tiny_edgetam_config() if tiny else edgetam_config()
    with seeded(seed):
        return EdgeTamModel(config)


def load_edgetam(spec: SegmenterSpec) -> HfSamSegmenter:
    """The EdgeTAM segmenter ``spec`` describes: weights from the hub (pinned), a local directory, an
    ``s3://`` prefix or "random"; ``tiny`` = the tiny random architecture.

    EdgeTAM is the CPU choice, so ``device="auto"`` without CUDA runs on the CPU instead of refusing.
    """
    if spec.image_size is not None:
        raise ModelConfigError("edgetam: image_size is fixed by the model (1024; 128 tiny), leave it unset")
    resolved = resolve_pretrained_dir(
        spec.checkpoint, EDGETAM, cache_dir=spec.cache(), allow_download=spec.allow_download
    )
    if spec.device == AUTO and not torch.cuda.is_available():
        spec = replace(spec, device="cpu")
    device, precision = spec_runtime(spec, resolved)
    model = build_edgetam(resolved, tiny=spec.tiny, seed=spec.seed)
    info = {"model": "edgetam", "variant": "tiny" if spec.tiny else "", **spec_identity(spec, resolved)}
    return HfSamSegmenter(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        max_boxes_per_call=spec.max_boxes_per_call,
        info=info,
    )


class HfSamSegmenter:
    """Segments box and/or click prompts with transformers' ``EdgeTamModel``, a batch of images at a time.

    Arguments:
      model: a built ``EdgeTamModel``; its prompt encoder's ``image_size`` S sets the input size.
      device, precision: where and how to run (precision "bf16" = autocast, weights stay fp32).
      batch_size: images per image-encoder pass.
      max_boxes_per_call: prompts per decoder call (each repeats its image's embedding: memory).
      info: identity for metadata (checkpoint digest, ...), returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        precision: str = FP32,
        batch_size: int = 8,
        max_boxes_per_call: int = 64,
        info: dict[str, Any] | None = None,
    ) -> None:
        enable_tf32(device)
        self.model = model.to(device).eval()
        # Predicted IoU and object score in fp32 under bf16 autocast: bf16 IoUs tie (see sam2_segmenter).
        run_in_fp32(model.mask_decoder.iou_prediction_head)
        run_in_fp32(model.mask_decoder.pred_obj_score_head)
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = int(model.config.prompt_encoder_config.image_size)
        self.max_boxes_per_call = max_boxes_per_call
        self._info = dict(info or {})
        self._scale, self._shift = normalization(device)  # Sam2ImageProcessor: ImageNet mean / std
        self.bucket_cost = default_bucket_cost(device)

    def describe(self) -> dict[str, Any]:
        return describe_runtime(
            self._info, self.device, self.precision, self.batch_size, f"{self.image_size}x{self.image_size}"
        )

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + stretch one JPEG to S x S, as Sam2ImageProcessor does. ``pixels``: (3, S, S) uint8."""
        size = self.image_size
        return prepare_image(image_id, data, lambda w, h: (size, size), self.device)

    def segment(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool = False
    ) -> list[Candidates]:
        """``candidates[i]`` with one mask per candidate; boxes (N_i, 4) xyxy and clicks (N_i, P, 2) in
        original pixels of ``batch[i]``. ``multimask``: 3 masks per prompt, the highest predicted IoU kept."""
        if len(batch) != len(candidates):
            raise ValueError(f"{len(batch)} images but {len(candidates)} candidate sets")
        outputs = 3 if multimask else 1
        results = [found.with_no_masks(outputs) if not len(found) else None for found in candidates]
        todo = [i for i, found in enumerate(candidates) if len(found)]
        if not todo:
            return results
        with inference(self.device, self.precision):
            pixels = torch.stack([batch[i].pixels.to(self.device, non_blocking=True) for i in todo])
            levels = self.model.get_image_embeddings(pixels.float() * self._scale - self._shift)
            for k, i in enumerate(todo):
                embedding = [level[k : k + 1] for level in levels]
                logits, scores, chosen = self._decode(batch[i], candidates[i], embedding, multimask)
                results[i] = self._masks(batch[i], candidates[i], logits, scores, chosen)
        return results

    def _decode(
        self, item: PreparedImage, found: Candidates, embedding: list[torch.Tensor], multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's N prompts, per layout -> in candidate order, the best of K outputs: logits
        (N, s, s) fp32, every IoU (N, K) fp32 and the index kept (N,) int64."""
        scale = np.array([self.image_size / item.width, self.image_size / item.height], np.float32)
        logits, scores, chosen, rows = [], [], [], []
        for group in prompt_groups([found]):
            boxes = None if group.boxes is None else group.boxes * np.tile(scale, 2)
            clicks = group.click_points * scale
            for start in range(0, len(group.rows), self.max_boxes_per_call):
                part = slice(start, start + self.max_boxes_per_call)
                prompts: dict[str, torch.Tensor] = {}
                if boxes is not None:  # (1, n, 4); the encoder shifts these in place: a fresh copy each call
                    prompts["input_boxes"] = to_device(boxes[part][None], self.device)
                if group.clicks:  # (1, n, P, 2), (1, n, P)
                    prompts["input_points"] = to_device(clicks[part][None], self.device)
                    prompts["input_labels"] = to_device(
                        group.click_labels[part][None].astype(np.int64), self.device
                    )
                out = self.model(image_embeddings=embedding, multimask_output=multimask, **prompts)
                iou = out.iou_scores[0].float()  # (n, K)
                best = iou.argmax(dim=1)
                logits.append(out.pred_masks[0][torch.arange(len(best), device=best.device), best].float())
                scores.append(iou)
                chosen.append(best)
            rows.append(group.rows)
        low_res, iou, best = torch.cat(logits), torch.cat(scores), torch.cat(chosen)
        if len(rows) > 1:  # decoded layout by layout: back to candidate order
            order = to_device(np.argsort(np.concatenate(rows)), self.device)
            low_res, iou, best = low_res[order], iou[order], best[order]
        return low_res, iou, best

    def _masks(
        self,
        item: PreparedImage,
        found: Candidates,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        best: torch.Tensor,
    ) -> Candidates:
        """(N, s, s) logits -> bilinear to H x W inside each mask's positive bound, > 0 -> COCO RLE.
        Two syncs: the bounds with the scores, then the masks (:mod:`mask_upsample`)."""
        n, low = len(found), low_res.shape[-1]
        bounds, scores, chosen = HostCopy([positive_bounds(low_res), iou, best]).wait()
        crops = crop_boxes(low, [item], [n], bounds)
        heights, widths = np.full(n, item.height), np.full(n, item.width)
        plan = plan_crops(low, crops, heights, widths, bucket_cost=self.bucket_cost)
        (changes,) = planned_changes(plan, low_res).wait()
        encoded = encode_crop_changes(changes, plan.boxes, item.height, item.width, plan.offsets)
        return found.with_masks(encoded, scores[np.arange(n), chosen], chosen.astype(np.int8), scores)
