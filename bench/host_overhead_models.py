"""What bench/gpu_host_overhead.py compares: instant stand-ins for the models, and the previous code
path of the detections and masks stages, frozen (git rev 5509c3d) as the benchmark's baseline.

The stand-ins return correctly shaped tensors (Grounding DINO's (B, 900, T) logits and (B, 900, 4)
boxes; SAM2's image features, (n, K, 256, 256) low-res logits shaped like each box, IoU), so that only
the code around the models is timed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pseudolabel.models.grounding_dino import EncodedCaption, GroundingDinoDetector
from pseudolabel.models.interfaces import Candidates
from pseudolabel.models.runtime import inference
from pseudolabel.models.sam2_segmenter import Sam2Segmenter
from pseudolabel.rle import EncodedMasks, encode_device_masks

SAM_SIZE = 1024  # SAM2 input; low-res logits are SAM_SIZE / 4
QUERIES = 900
CAPTION = "plant ."


# ---- stand-in models ---------------------------------------------------------------------------------


class StandInSam2(nn.Module):
    """SAM2Base's surface as Sam2Segmenter uses it, answering instantly. ``bank``: the (N, K, s, s) logits
    the next decoder calls return, in box order (set per image batch)."""

    def __init__(self, device: torch.device, batch_size: int) -> None:
        super().__init__()
        self.image_size = SAM_SIZE
        self.directly_add_no_mem_embed = False
        s = SAM_SIZE // 4
        self._sizes = [(s, s), (s // 2, s // 2), (s // 4, s // 4)]
        self._features = [
            torch.zeros(h * w, batch_size, c, device=device)
            for (h, w), c in zip(self._sizes, (32, 64, 256), strict=True)
        ]
        self._pe = torch.zeros(1, 256, s // 4, s // 4, device=device)
        self.bank: torch.Tensor | None = None
        self.iou: torch.Tensor | None = None
        self.cursor = 0
        outer = self

        class Prompts:
            def __call__(self, points, boxes, masks):
                n = points[0].shape[0]
                return torch.zeros(n, 3, 256, device=device), outer._pe.expand(n, -1, -1, -1)

            def get_dense_pe(self):
                return outer._pe

        class Decoder:
            def __call__(self, image_embeddings, sparse_prompt_embeddings, multimask_output, **_):
                n = sparse_prompt_embeddings.shape[0]
                rows = slice(outer.cursor, outer.cursor + n)
                outer.cursor += n
                k = 3 if multimask_output else 1
                return outer.bank[rows, :k], outer.iou[rows, :k], None, None

        self.sam_prompt_encoder = Prompts()
        self.sam_mask_decoder = Decoder()

    def forward_image(self, images: torch.Tensor) -> dict:
        return {"batch": images.shape[0]}

    def _prepare_backbone_features(self, backbone_out: dict):
        b = backbone_out["batch"]
        return None, [f[:, :b] for f in self._features], None, self._sizes


def box_logits(boxes: np.ndarray, width: int, height: int, device: torch.device) -> torch.Tensor:
    """(N, 3, s, s) low-res logits positive inside each box (in SAM2's stretched frame), smooth edges."""
    s = SAM_SIZE // 4
    scale = np.array([s / width, s / height, s / width, s / height], np.float32)
    b = torch.from_numpy(boxes * scale).to(device)
    grid = torch.arange(s, device=device, dtype=torch.float32) + 0.5
    rows = torch.minimum(grid - b[:, 1, None], b[:, 3, None] - grid)  # (N, s)
    cols = torch.minimum(grid - b[:, 0, None], b[:, 2, None] - grid)
    logits = torch.minimum(rows[:, :, None], cols[:, None, :]).clamp(-8, 8)  # (N, s, s)
    return torch.stack([logits, logits - 1, logits + 1], dim=1)


class StandInDino(GroundingDinoDetector):
    """Grounding DINO whose backbone and transformer answer instantly with preset (B, Q, T) logits and
    (B, Q, 4) boxes where ``candidates`` queries pass the floors."""

    def __init__(self, device: torch.device, candidates: int, batch_size: int) -> None:
        model = nn.Module()
        model.backbone, model.transformer = nn.Identity(), nn.Identity()
        super().__init__(model, device=device, batch_size=batch_size)
        tokens = 4  # [CLS] plant . [SEP]
        phrase = torch.tensor([[False, True, False, False]], device=device)
        self._captions[CAPTION] = EncodedCaption(
            CAPTION,
            torch.zeros(1, tokens, 256, device=device),
            torch.ones(1, tokens, dtype=torch.bool, device=device),
            torch.zeros(1, tokens, dtype=torch.long, device=device),
            torch.ones(1, tokens, tokens, dtype=torch.bool, device=device),
            phrase,
            ["plant"],
        )
        rng = np.random.default_rng(0)
        logits = np.full((batch_size, QUERIES, tokens), -10, np.float32)
        logits[:, :candidates, 1] = rng.uniform(-2, 3, (batch_size, candidates))
        centre = rng.uniform(0.2, 0.8, (batch_size, QUERIES, 2))
        size = rng.uniform(0.05, 0.4, (batch_size, QUERIES, 2))
        self._logits = torch.from_numpy(logits).to(device)
        self._boxes = torch.from_numpy(np.concatenate([centre, size], -1).astype(np.float32)).to(device)

    def _image_features(self, samples):
        return samples.tensors.shape[0]

    def _decode(self, features, encoded):
        return self._logits[:features], self._boxes[:features]


# ---- the previous code path (git rev 5509c3d), verbatim but for the class and self.* names ------------


class PreviousSegmenter(Sam2Segmenter):
    """``Sam2Segmenter.segment`` as of 5509c3d: per image, per chunk of boxes, full-image upsampling."""

    def segment(self, batch, candidates, *, multimask=False):
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

    def _segment_one(self, item, found, index, embeddings, high_res, multimask):
        outputs = 3 if multimask else 1
        if len(found) == 0:
            return found.with_no_masks(outputs)
        boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
        logits, scores = [], []
        for start in range(0, len(boxes), self.max_boxes_per_call):
            chunk_logits, chunk_scores = self._decode_previous(
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

    def _decode_previous(self, boxes, item, index, embeddings, high_res, multimask):
        model = self.model
        scale = torch.tensor(
            [self.image_size / item.width, self.image_size / item.height], device=self.device
        )
        corners = torch.tensor(boxes, dtype=torch.float32, device=self.device).view(-1, 2, 2) * scale
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).expand(len(boxes), 2)
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

    def _binarize_and_encode(self, low_res, height, width):
        chunk_pixels = 1 << 27  # the previous default
        per_chunk = max(1, chunk_pixels // (height * width))
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


class PreviousDino(StandInDino):
    """``GroundingDinoDetector.detect`` / ``_select`` as of 5509c3d (5 transfers + a bool() per caption)."""

    def detect(self, batch, captions, *, box_floor=0.05, text_floor=0.05, max_candidates=300):
        if not batch:
            return []
        per_caption = []
        with inference(self.device, self.precision):
            samples = self._batch_tensor(batch)
            features = self._image_features(samples)
            for caption_index, caption in enumerate(captions):
                encoded = self.encode_caption(caption)
                logits, boxes = self._decode(features, encoded)
                offset = caption_index * logits.shape[1]
                per_caption.append(
                    self._select_previous(batch, logits, boxes, encoded, box_floor, text_floor, offset)
                )
        return [Candidates.concat(found).top(max_candidates) for found in zip(*per_caption, strict=True)]

    def _select_previous(self, batch, logits, boxes, encoded, box_floor, text_floor, query_offset=0):
        probs = logits.sigmoid()
        box_scores = probs.max(dim=-1).values
        phrase_tokens = encoded.phrase_tokens
        in_phrase = phrase_tokens.any(dim=0)
        if not bool(in_phrase.any()):
            return [Candidates.empty(item.image_id, item.width, item.height) for item in batch]
        token_phrase = phrase_tokens.float().argmax(dim=0)
        best_token = probs.masked_fill(~in_phrase, -1.0).argmax(dim=-1)
        phrase = token_phrase[best_token]
        text_scores = probs.masked_fill(~phrase_tokens[phrase], 2.0).amin(dim=-1)
        keep = (box_scores > box_floor) & (text_scores > text_floor)
        keep, boxes, box_scores, text_scores, phrase = (
            t.cpu().numpy() for t in (keep, boxes, box_scores, text_scores, phrase)
        )
        found = []
        for i, item in enumerate(batch):
            rows = np.flatnonzero(keep[i])
            size = np.array([item.width, item.height, item.width, item.height], np.float32)
            cx, cy, w, h = boxes[i, rows].T
            xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * size
            found.append(
                Candidates(
                    item.image_id,
                    item.width,
                    item.height,
                    boxes=np.clip(xyxy, 0, size).astype(np.float32).reshape(-1, 4),
                    box_scores=box_scores[i, rows],
                    text_scores=text_scores[i, rows],
                    phrases=[encoded.phrases[p] for p in phrase[i, rows]],
                    query_indices=(rows + query_offset).astype(np.int32),
                )
            )
        return found
