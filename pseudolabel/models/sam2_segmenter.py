"""Batched SAM2 segmentation of box and click prompts, masks upsampled only where they can be positive.

``SAM2ImagePredictor`` embeds one image per call (or a list through ``set_image_batch``, whose
feature sizes are hard-wired to 1024 px inputs) and returns float32 masks at full resolution on the
host: ~480 MB for a 12 MP image with 10 boxes. :class:`Sam2Segmenter` instead, per batch of B images
with N boxes in all (S = model input size, s = S/4, H x W = each image's original size):

    encode     (B, 3, S, S) uint8 -> embeddings (B, 256, S/16, S/16) + high-res (B, 32, s, s), (B, 64, s/2, s/2)
    decode     all N prompts of the batch together, ``max_boxes_per_call`` at a time, each reading its
               own image's features -> low-res logits (N, K, s, s), IoU (N, K) -> best of K: (N, s, s)
    bound      per mask, the low-res rows/columns holding a logit > 0            -> (N, 4), sync 1
    upsample   bilinear to H x W inside each bound only, > 0, into one flat bool buffer, masks of similar
               crop size in one batched pass (``mask_upsample.plan_crops`` / ``fill_planned``; how
               similar: ``bucket_cost``, few large passes on CUDA, finer ones on the CPU)
    copy       where that buffer changes value, to (pinned) host memory, ``non_blocking`` -> sync 2, later
    encode     COCO RLE from the change positions (``rle.encode_crop_changes``, vectorised over the
               masks) on worker threads, overlapping the next batch

Why skipping everything outside the bound is exact: a bilinear output pixel is a convex combination
(non-negative weights) of at most 2 x 2 low-res logits, so where those are all <= 0 it is <= 0 too,
i.e. background. Inside the bound the interpolation uses PyTorch's source indices and weights
(``mask_upsample.BilinearAxis``) as two separable passes; the values equal ``F.interpolate(mode="bilinear",
align_corners=False)`` to within float rounding (PyTorch's kernel orders / fuses the products
differently), so a pixel can only flip where its logit is within ~1 ulp of 0 (2 pixels in 216 M
measured). ``tests/worker/test_sam2_segmenter.py`` checks both: nothing positive outside the crops,
and the masks equal full upsampling.

Prompts. A candidate's prompt is its box (when ``Candidates.box_prompts()[i]``: two corner points with
labels 2, 3, as ``SAM2ImagePredictor`` encodes boxes), then its clicks in their order (label 1 object,
0 background; -1 padding is dropped), all in original pixels scaled to the S x S input like the boxes.
SAM2's prompt encoder appends one padding token to every prompt. Candidates are decoded in groups of one
layout (box or not, number of clicks: :func:`prompt_groups`), so no prompt carries extra padding tokens
and each mask equals the stock predictor's ``predict(point_coords, point_labels, box)`` for that
candidate alone; box-only batches (the detectors' case) are one group, in order, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import SegmenterSpec, spec_checkpoint, spec_identity, spec_runtime
from pseudolabel.models.mask_upsample import (
    crop_boxes,
    default_bucket_cost,
    plan_crops,
    planned_changes,
    positive_bounds,
)
from pseudolabel.models.prompts import prompt_groups
from pseudolabel.models.runtime import (
    FP32,
    HostCopy,
    describe_runtime,
    device_scope,
    enable_tf32,
    inference,
    normalization,
    prepare_image,
    run_in_fp32,
    to_device,
    usable_cpus,
)
from pseudolabel.models.sam2_build import VARIANTS, build_sam2_model, sam2_overrides
from pseudolabel.rle import encode_crop_changes


def load_sam2(spec: SegmenterSpec) -> Sam2Segmenter:
    """The segmenter ``spec`` describes: checkpoint fetched and verified, model built and placed."""
    resolved = spec_checkpoint(spec, VARIANTS[spec.variant].checkpoint)
    device, precision = spec_runtime(spec, resolved)
    overrides = sam2_overrides(spec.tiny, spec.image_size)
    with device_scope(device):  # sam2 puts some tables on "cuda" while building: the model's device
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
    """Segments box and/or click prompts with a SAM2 model, a batch of images at a time.

    Arguments:
      model: a built ``SAM2Base`` (see :func:`build_sam2_model`); its ``image_size`` S sets the input size.
      device, precision: where and how to run (precision "bf16" = autocast, weights stay fp32).
      batch_size: images per image-encoder pass.
      max_boxes_per_call: prompts (candidates) per mask-decoder call, taken across the images of a batch.
      chunk_pixels: how many crop pixels one round upsamples into a device buffer and copies to the
        host; a batch whose masks have more is done in several rounds (one sync each). Counted before
        the crops grow into their buckets (growth is bounded by ``bucket_cost`` per bucket).
      rle_workers: threads encoding RLE while the next batch runs (default: min(4, usable CPUs)).
      mix_images: let one decoder call hold several images' boxes (default: on CUDA only; mixing saves
        kernel launches on a GPU, while on the CPU gathering each box's image features costs more
        than the call, see bench/gpu_host_overhead.py).
      bucket_cost: what one batched upsampling pass costs beyond its pixels, in pixels: how readily
        masks of different crop sizes share a pass (default ``mask_upsample.BUCKET_COST`` of the device).
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
        chunk_pixels: int = 1 << 30,
        rle_workers: int | None = None,
        mix_images: bool | None = None,
        bucket_cost: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        enable_tf32(device)
        self.model = model.to(device).eval()
        fp32_heads(model)
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = int(model.image_size)
        self.max_boxes_per_call = max_boxes_per_call
        self.chunk_pixels = chunk_pixels
        self._info = dict(info or {})
        self._scale, self._shift = normalization(device)
        self._corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=device)  # box = 2 corner points
        self.mix_images = device.type == "cuda" if mix_images is None else mix_images
        self.bucket_cost = bucket_cost or default_bucket_cost(device)
        self._rle = ThreadPoolExecutor(
            max_workers=rle_workers or min(4, usable_cpus()), thread_name_prefix="rle"
        )

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
        """``candidates[i]`` with one mask per candidate; their boxes (N_i, 4) xyxy and clicks (N_i, P, 2)
        in original pixels of ``batch[i]`` (the module docstring says how they make a prompt).

        With ``multimask`` SAM2 returns 3 masks per prompt and the highest predicted IoU is kept; without,
        1 mask (SAM2's own stability fallback may still pick among its 3 internally).
        """
        return self.submit(batch, candidates, multimask=multimask).result()

    def submit(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool = False
    ) -> PendingMasks:
        """:meth:`segment` whose RLE encoding is still running on worker threads: the device work and
        copies are queued, so the caller can submit the next batch before collecting this one."""
        if len(batch) != len(candidates):
            raise ValueError(f"{len(batch)} images but {len(candidates)} candidate sets")
        outputs = 3 if multimask else 1
        counts = [len(found) for found in candidates]
        if not sum(counts):
            return PendingMasks([_done(found.with_no_masks(outputs)) for found in candidates])
        with inference(self.device, self.precision):
            embeddings, high_res = self._encode(batch)
            low_res, iou, chosen = self._decode(batch, candidates, embeddings, high_res, multimask)
            del embeddings, high_res
            # Sync 1: which low-res rows/columns of each mask hold a positive logit, and the scores.
            bounds, chosen_host, iou_host = HostCopy([positive_bounds(low_res), chosen, iou]).wait()
            crops = crop_boxes(self.image_size // 4, batch, counts, bounds)
            rounds = self._upsample(low_res, batch, counts, crops)
        futures = []
        first = 0
        for found, count, (copy, boxes, offsets) in zip(candidates, counts, rounds, strict=True):
            rows = slice(first, first + count)
            first += count
            if not count:
                futures.append(_done(found.with_no_masks(outputs)))
                continue
            scores = iou_host[rows]
            picked = chosen_host[rows].astype(np.int64)
            futures.append(
                self._rle.submit(
                    _finish, found, copy, boxes, offsets, scores[np.arange(count), picked], picked, scores
                )
            )
        return PendingMasks(futures)

    def _encode(self, batch: Sequence[PreparedImage]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image encoder on the whole batch: embeddings (B, C, S/16, S/16), high-res [(B, C0, S/4, S/4), (B, C1, S/8, S/8)]."""
        # Copy each pinned tensor on its own: stacking on the host would make a pageable (synchronous) copy.
        pixels = torch.stack([item.pixels.to(self.device, non_blocking=True) for item in batch])
        # In place: the same two float operations, without two more image-sized allocations (on the
        # CPU each fresh allocation faults its pages in: ~4x the cost of the arithmetic).
        images = pixels.float().mul_(self._scale).sub_(self._shift)
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

    def _decode(
        self,
        batch: Sequence[PreparedImage],
        candidates: Sequence[Candidates],
        embeddings: torch.Tensor,
        high_res: list[torch.Tensor],
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for the N candidates of the batch: per prompt layout
        (:func:`prompt_groups`), ``max_boxes_per_call`` at a time.

        Returns, in candidate order, the best of the K outputs per prompt: logits (N, S/4, S/4) fp32,
        and IoU (N, K) fp32, index (N,) int32.
        """
        model = self.model
        # Original pixels -> model input frame (the image was stretched to S x S), on the host: one copy
        # per layout.
        owner = np.concatenate([np.full(len(found), i, np.int64) for i, found in enumerate(candidates)])
        scale = np.array(
            [[self.image_size / item.width, self.image_size / item.height] for item in batch], np.float32
        )
        image_pe = model.sam_prompt_encoder.get_dense_pe()
        logits, ious, chosen = [], [], []
        groups = prompt_groups(candidates)
        for group in groups:
            owners = owner[group.rows]
            points = to_device(group.points * scale[owners][:, None, :], self.device)  # (M, T, 2)
            labels = (
                self._corner_labels.expand(len(group.rows), 2)  # box-only: no per-prompt labels to copy
                if group.clicks == 0
                else to_device(group.labels, self.device)
            )
            owner_device = to_device(owners, self.device) if self.mix_images else None
            counts = np.bincount(owners, minlength=len(batch))
            for part in _decoder_calls(counts, self.max_boxes_per_call, self.mix_images):
                n = part.stop - part.start
                images = np.unique(owners[part])
                if len(images) == 1:  # one image's prompts: its features broadcast, as the stock predictor
                    one = slice(int(images[0]), int(images[0]) + 1)
                    image_embeddings, levels, repeat = embeddings[one], [lvl[one] for lvl in high_res], n > 1
                else:  # several images' prompts: each reads its own image's features
                    index = owner_device[part]
                    image_embeddings = embeddings.index_select(0, index)
                    levels, repeat = [level.index_select(0, index) for level in high_res], False
                sparse, dense = model.sam_prompt_encoder(
                    points=(points[part], labels[part]), boxes=None, masks=None
                )  # boxes=None: one padding token appended, as SAM2ImagePredictor does
                low_res, iou, _, _ = model.sam_mask_decoder(
                    image_embeddings=image_embeddings,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                    repeat_image=repeat,
                    high_res_features=levels,
                )  # (n, K, S/4, S/4), (n, K)
                iou = iou.float()
                best = iou.argmax(dim=1)
                logits.append(low_res[torch.arange(n, device=low_res.device), best].float())
                ious.append(iou)
                chosen.append(best.int())
        low_res, iou, best = torch.cat(logits), torch.cat(ious), torch.cat(chosen)
        if len(groups) > 1:  # decoded layout by layout: back to candidate order
            order = to_device(np.argsort(np.concatenate([group.rows for group in groups])), self.device)
            low_res, iou, best = low_res[order], iou[order], best[order]
        return low_res, iou, best

    def _upsample(
        self, low_res: torch.Tensor, batch: Sequence[PreparedImage], counts: Sequence[int], crops: np.ndarray
    ) -> list[tuple[HostCopy, np.ndarray, np.ndarray]]:
        """Each mask (N, s, s) -> bilinear to its image's H x W inside its crop -> > 0, into flat bool
        buffers laid out by ``mask_upsample.plan_crops`` (masks with similar crop sizes upsampled
        together), copied to the host ``chunk_pixels`` at most at a time (whole images per copy).

        Returns, per image, the copy holding its masks, their filled rectangles (n, 4) and slot offsets (n,).
        """
        low = low_res.shape[-1]
        starts = np.cumsum([0, *counts])
        placed: list[tuple[HostCopy, np.ndarray, np.ndarray]] = []
        first = 0  # first image of the round being planned

        def flush(stop: int) -> None:
            rows = slice(int(starts[first]), int(starts[stop]))
            sizes = np.repeat(
                [[item.height, item.width] for item in batch[first:stop]], counts[first:stop], axis=0
            )
            plan = plan_crops(
                low,
                crops[rows],
                sizes[:, 0].reshape(-1),
                sizes[:, 1].reshape(-1),
                bucket_cost=self.bucket_cost,
            )
            copy = planned_changes(plan, low_res[rows])
            for i in range(first, stop):
                mine = slice(int(starts[i] - starts[first]), int(starts[i + 1] - starts[first]))
                placed.append((copy, plan.boxes[mine], plan.offsets[mine]))

        total = 0
        for i, count in enumerate(counts):
            rows = slice(int(starts[i]), int(starts[i + 1]))
            size = int((crops[rows, 2] * (crops[rows, 3] + 1)).sum() * 2 + 2 * count)  # bound of its slots
            if i > first and total + size > self.chunk_pixels:
                flush(i)
                first, total = i, 0
            total += size
        flush(len(batch))
        return placed


def fp32_heads(model: nn.Module) -> None:
    """SAM2's predicted-IoU and object-score heads in fp32 under bf16 autocast (:func:`run_in_fp32`): in
    bf16 the three multimask IoUs round to steps of 2^-8 and often tie, and ties pick the first mask."""
    decoder = getattr(model, "sam_mask_decoder", None)
    for name in ("iou_prediction_head", "pred_obj_score_head"):  # the latter only with object pointers
        head = getattr(decoder, name, None)
        if isinstance(head, nn.Module):
            run_in_fp32(head)


class PendingMasks:
    """A batch submitted to :meth:`Sam2Segmenter.submit`; :meth:`result` waits for its RLE encoding."""

    def __init__(self, futures: list[Future[Candidates]]) -> None:
        self._futures = futures

    def result(self) -> list[Candidates]:
        return [future.result() for future in self._futures]


def _decoder_calls(counts: Sequence[int], limit: int, mix_images: bool = True) -> list[slice]:
    """Boxes of consecutive images packed into mask-decoder calls of at most ``limit`` boxes; an image
    with more boxes than that gets calls of its own. Slices of the batch's concatenated boxes.

    ``mix_images=False``: one image per call, as the stock predictor does (its features broadcast).
    """
    if not mix_images:
        calls, start = [], 0
        for count in counts:
            calls += [
                slice(first, min(first + limit, start + count))
                for first in range(start, start + count, limit)
            ]
            start += count
        return calls
    calls, start, size = [], 0, 0
    for count in counts:
        if size and size + count > limit:
            calls.append(slice(start, start + size))
            start, size = start + size, 0
        if count > limit:
            whole = count - count % limit
            calls += [slice(first, first + limit) for first in range(start, start + whole, limit)]
            start, count = start + whole, count % limit
        size += count
    if size:
        calls.append(slice(start, start + size))
    return calls


def _finish(
    found: Candidates,
    copy: HostCopy,
    boxes: np.ndarray,
    offsets: np.ndarray,
    mask_scores: np.ndarray,
    chosen: np.ndarray,
    scores: np.ndarray,
) -> Candidates:
    """On an RLE thread: wait for the crops' change positions (sync 2, once per copy) and encode one
    image's masks."""
    (changes,) = copy.wait()
    encoded = encode_crop_changes(changes, boxes, found.height, found.width, offsets)
    return found.with_masks(
        encoded, mask_scores=mask_scores, multimask_index=chosen.astype(np.int8), multimask_scores=scores
    )


def _done(value: Candidates) -> Future[Candidates]:
    future: Future[Candidates] = Future()
    future.set_result(value)
    return future
