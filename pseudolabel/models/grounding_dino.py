"""Batched Grounding DINO (groundingdino-py): padded image batches against captions encoded once.

``GroundingDINO.forward`` re-tokenises and re-runs BERT on every call and evaluates the box and
class heads of every decoder layer. :class:`GroundingDinoDetector` calls the same submodules in
three steps instead:

    encode_caption   tokenizer + BERT + feat_map, once per caption (cached)     -> (1, T, 256)
    _image_features  Swin backbone + input projections, once per image batch   -> 4 x (B, 256, h_l, w_l)
    _decode          image-text fusion encoder + decoder, heads of the LAST layer only
                                                                                 -> logits (B, Q, T), boxes (B, Q, 4)

so a fixed prompt costs BERT once per run, and with one prompt per class the backbone runs once
per batch, not once per class. ``tests/worker/test_grounding_dino.py`` checks parity with ``forward``.

Scores kept per candidate (query), so any threshold above the floors can be applied later:

    box_score   max sigmoid over the caption's tokens (what Grounding DINO's box_threshold tests)
    phrase      the caption phrase ("potted plant") holding the query's best phrase token
    text_score  min sigmoid over that phrase's tokens: the highest text_threshold at which
                Grounding DINO would still report the whole phrase
    query_index the decoder query the box came from: Grounding DINO's own output order (``predict``
                returns the queries above box_threshold in query index order, unsorted). With several
                captions (one prompt per class) it is caption_index * num_queries + query, so the
                merged order is caption by caption, each in query order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pseudolabel.models import grounding_dino_patch
from pseudolabel.models.grounding_dino_patch import spatial_shapes
from pseudolabel.models.interfaces import Candidates, PreparedImage, normalize_caption
from pseudolabel.models.runtime import (
    FP32,
    HostCopy,
    ImageDecoding,
    describe_runtime,
    enable_tf32,
    inference,
    normalization,
)

# compile: true pads every batch to a multiple of this many pixels per side (and to the batch size), so
# the number of static shapes Dynamo compiles stays bounded (see GroundingDinoDetector).
COMPILE_SHAPE_STEP = 128


def compiled_shapes(max_size: int, step: int = COMPILE_SHAPE_STEP) -> int:
    """How many padded (H, W) shapes a detector with long side ``max_size`` can meet: both sides are
    multiples of ``step`` up to ``max_size`` rounded up."""
    return (-(-max_size // step)) ** 2


def input_size(width: int, height: int, short_side: int, max_size: int) -> tuple[int, int]:
    """(w, h) of the model input: short side ``short_side`` unless the long side would exceed ``max_size``
    (Grounding DINO's RandomResize([800], max_size=1333) rule)."""
    short, long = min(width, height), max(width, height)
    if long * short_side > max_size * short:
        short_side = int(round(max_size * short / long))
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


@dataclass(frozen=True)
class EncodedCaption:
    """A caption's text features, computed once. T = number of tokens (<= max_text_len)."""

    caption: str
    features: torch.Tensor  # (1, T, 256) BERT -> feat_map
    token_mask: torch.Tensor  # (1, T) bool, True = real token
    position_ids: torch.Tensor  # (1, T) long, restart at every phrase
    self_attention: torch.Tensor  # (1, T, T) bool, tokens attend within their phrase
    phrase_tokens: torch.Tensor  # (C, T) bool, tokens of each of the C phrases
    phrases: list[str]  # (C,) decoded phrase text
    has_phrase_tokens: bool = True  # any token in any phrase (known on the host: no sync per batch)


class GroundingDinoDetector:
    """Runs a Grounding DINO model on batches of images for a fixed set of captions.

    Arguments:
      model: a built ``GroundingDINO`` (see :func:`build_grounding_dino`).
      device, precision: where and how to run (precision "bf16" = autocast, weights stay fp32).
      batch_size: images per forward pass.
      image_size, max_size: model input short side and long-side cap (800 / 1333 as trained).
      compile: ``torch.compile`` the backbone and the transformer with static shapes (opt-in; speed-up
        unmeasured here, see the README's GPU throughput notes). Every batch is then padded to the
        batch size (copies of its first image, dropped from the results) and each side to a multiple
        of :data:`COMPILE_SHAPE_STEP` px, so Dynamo meets at most :func:`compiled_shapes` shapes and its
        recompile limit is raised to that: past the limit (8 by default) it would silently run
        uncompiled after paying for 8 compilations. The padding changes the numbers slightly (the
        backbone sees more border), so it enters :meth:`describe`.
      decode_on_device: decode each batch's JPEGs on ``device`` in one call and resize them there
        (:class:`ImageDecoding`) instead of decoding + resizing in the CPU workers (opt-in).
      info: identity for metadata (variant, checkpoint sha256, ...), returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        precision: str = FP32,
        batch_size: int = 8,
        image_size: int = 800,
        max_size: int = 1333,
        compile: bool = False,
        decode_on_device: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        grounding_dino_patch.install()
        enable_tf32(device)
        self.model = model.to(device).eval()
        self.compiled = compile
        # Called through these (the model's own attributes stay as built: weights, indexing, state_dict).
        # Static shapes: one compilation per padded batch shape. With symbolic shapes (dynamic=True, or
        # the default's switch to them at the second shape) Dynamo's shape reasoning over the Swin
        # window padding grows without bound in sympy: tracing the tiny model had not finished after
        # 10 minutes, against ~4 s per shape static (tests/worker/test_grounding_dino.py).
        self._backbone: Any = torch.compile(model.backbone, dynamic=False) if compile else model.backbone
        self._transformer: Any = (
            torch.compile(model.transformer, dynamic=False) if compile else model.transformer
        )
        self.shape_step = COMPILE_SHAPE_STEP if compile else 0  # 0: pad to the batch's largest image only
        if compile:
            from torch._dynamo import config as dynamo

            shapes = compiled_shapes(max_size, self.shape_step)
            dynamo.recompile_limit = max(dynamo.recompile_limit, shapes)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 2 * shapes)
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = image_size
        self.max_size = max_size
        self._info = dict(info or {})
        self.decoding = ImageDecoding(device, decode_on_device)
        # Normalisation folded into one affine map of the 0..255 uint8 input.
        self._scale, self._shift = normalization(device)
        self._captions: dict[str, EncodedCaption] = {}

    def describe(self) -> dict[str, Any]:
        described = describe_runtime(
            self._info,
            self.device,
            self.precision,
            self.batch_size,
            f"short {self.image_size} / max {self.max_size}",
        )
        if self.decoding.on_device:  # only when on: default runs keep their earlier fingerprints
            described["decode_on_device"] = True
        if self.shape_step:
            described["padded_shapes"] = (
                f"batch of {self.batch_size}, sides multiples of {self.shape_step} px"
            )
        return described

    # ---- CPU side (background workers) ---------------------------------------------------------

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + resize one JPEG. ``pixels``: (3, h, w) uint8, pinned when running on CUDA; with
        ``decode_on_device`` the still-encoded JPEG, decoded with its batch in :meth:`detect`."""
        target = lambda w, h: input_size(w, h, self.image_size, self.max_size)  # noqa: E731
        return self.decoding.prepare(image_id, data, target)

    # ---- accelerator side --------------------------------------------------------------------------

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str],
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        """Candidates with ``box_score > box_floor`` and ``text_score > text_floor`` for every caption,
        merged per image, sorted by box score, at most ``max_candidates`` per image. ``query_indices``
        keeps the model's output order (caption_index * num_queries + decoder query)."""
        if not batch:
            return []
        batch = self.decoding.decoded(batch)
        per_caption = []
        with inference(self.device, self.precision):
            samples = self._batch_tensor(batch)
            features = self._image_features(samples)
            for caption in captions:
                encoded = self.encode_caption(caption)
                logits, boxes = self._decode(features, encoded)
                scores = self._score(logits, boxes, encoded, box_floor, text_floor)
                per_caption.append((encoded, logits.shape[1], scores))
        # Every caption's (B, Q, 8) scores cross to the host together: one synchronisation per batch.
        # Rows past the batch (padding for compiled shapes) stay on the device.
        scored = [scores[: len(batch)] for _, _, scores in per_caption if scores is not None]
        host = iter(HostCopy(scored).wait() if scored else [])
        found = []
        offset = 0  # caption_index * num_queries: merged query indices stay unique and in caption order
        for encoded, queries, scores in per_caption:
            found.append(self._select(batch, None if scores is None else next(host), encoded, offset))
            offset += queries
        # Stable sort: equal box scores keep caption, then query order.
        return [Candidates.concat(parts).top(max_candidates) for parts in zip(*found, strict=True)]

    def encode_caption(self, caption: str) -> EncodedCaption:
        """Tokenise + BERT + feat_map for ``caption``; cached, so a fixed prompt is encoded once."""
        from groundingdino.models.GroundingDINO.bertwarper import (
            generate_masks_with_special_tokens_and_transfer_map,
        )

        caption = normalize_caption(caption)
        if caption in self._captions:
            return self._captions[caption]
        model = self.model
        tokenized = model.tokenizer([caption], padding="longest", return_tensors="pt").to(self.device)
        self_attention, position_ids, phrase_masks = generate_masks_with_special_tokens_and_transfer_map(
            tokenized, model.specical_tokens, model.tokenizer
        )
        length = min(tokenized["input_ids"].shape[1], model.max_text_len)
        input_ids = tokenized["input_ids"][:, :length]
        self_attention = self_attention[:, :length, :length]
        position_ids = position_ids[:, :length]
        bert_inputs = {
            "input_ids": input_ids,
            "token_type_ids": tokenized["token_type_ids"][:, :length],
            # Phrases attend only within themselves when sub_sentence_present (the trained setting).
            "attention_mask": self_attention
            if model.sub_sentence_present
            else tokenized["attention_mask"][:, :length],
        }
        if model.sub_sentence_present:
            bert_inputs["position_ids"] = position_ids
        # Once per caption, so fp32 regardless of the batch precision.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            features = model.feat_map(model.bert(**bert_inputs)["last_hidden_state"])
        phrase_tokens = (
            phrase_masks[0][:, :length] if len(phrase_masks[0]) else torch.zeros(0, length, dtype=torch.bool)
        )
        phrase_tokens = phrase_tokens.to(self.device)
        ids = input_ids[0].tolist()
        phrases = [
            model.tokenizer.decode([ids[t] for t in row.nonzero().flatten().tolist()])
            for row in phrase_tokens.cpu()
        ]
        encoded = EncodedCaption(
            caption=caption,
            features=features,
            token_mask=tokenized["attention_mask"][:, :length].bool(),
            position_ids=position_ids,
            self_attention=self_attention,
            phrase_tokens=phrase_tokens,
            phrases=phrases,
            has_phrase_tokens=bool(phrases) and bool(phrase_tokens.cpu().any()),
        )
        self._captions[caption] = encoded
        return encoded

    def forward_batch(self, samples: Any, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs for a ``NestedTensor`` batch: logits (B, Q, T), boxes (B, Q, 4) cxcywh in [0, 1]
        of each image's unpadded extent. Exposed for parity checks against ``GroundingDINO.forward``."""
        with inference(self.device, self.precision):
            return self._decode(self._image_features(samples), self.encode_caption(caption))

    def _batch_tensor(self, batch: Sequence[PreparedImage]) -> Any:
        """Normalise on the device and pad to the largest image: NestedTensor (B, 3, H, W) + mask (B, H, W)
        that is True on padding (the model ignores it, and predicts boxes relative to the unpadded part).
        With ``shape_step`` (compile): H and W rounded up to multiples of it, and B up to the batch size
        with copies of the first image."""
        from groundingdino.util.misc import NestedTensor

        height = max(item.pixels.shape[1] for item in batch)
        width = max(item.pixels.shape[2] for item in batch)
        rows = len(batch)
        if self.shape_step:
            height, width = (-(-side // self.shape_step) * self.shape_step for side in (height, width))
            rows = max(rows, self.batch_size)
        tensors = torch.zeros(rows, 3, height, width, device=self.device)
        mask = torch.ones(rows, height, width, dtype=torch.bool, device=self.device)
        for i, item in enumerate(batch):
            pixels = item.pixels.to(self.device, non_blocking=True)
            _, h, w = pixels.shape
            tensors[i, :, :h, :w] = pixels.float() * self._scale - self._shift
            mask[i, :h, :w] = False
        if rows > len(batch):
            tensors[len(batch) :] = tensors[0]
            mask[len(batch) :] = mask[0]
        return NestedTensor(tensors, mask)

    def _image_features(
        self, samples: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Backbone levels projected to the transformer width, with padding masks and position encodings."""
        from groundingdino.util.misc import NestedTensor

        model = self.model
        levels, positions = self._backbone(samples)
        sources, masks = [], []
        for level, feature in enumerate(levels):
            source, mask = feature.decompose()
            sources.append(model.input_proj[level](source))
            masks.append(mask)
        positions = list(positions)
        # Extra, coarser levels (stride-2 convs on top of the last backbone level).
        for level in range(len(levels), model.num_feature_levels):
            source = model.input_proj[level](levels[-1].tensors if level == len(levels) else sources[-1])
            mask = F.interpolate(samples.mask[None].float(), size=source.shape[-2:]).to(torch.bool)[0]
            sources.append(source)
            masks.append(mask)
            positions.append(model.backbone[1](NestedTensor(source, mask)).to(source.dtype))
        return sources, masks, positions

    def _decode(
        self, features: tuple[list, list, list], encoded: EncodedCaption
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from groundingdino.util.misc import inverse_sigmoid

        model = self.model
        sources, masks, positions = features
        batch = sources[0].shape[0]
        text = {
            "encoded_text": encoded.features.expand(batch, -1, -1),
            "text_token_mask": encoded.token_mask.expand(batch, -1),
            "position_ids": encoded.position_ids.expand(batch, -1),
            "text_self_attention_masks": encoded.self_attention.expand(batch, -1, -1),
        }
        with spatial_shapes(sources):
            hidden, references, _, _, _ = self._transformer(sources, masks, None, positions, None, None, text)
        # The transformer replaced text["encoded_text"] with the image-fused text features: the class
        # head must see those. Heads in fp32: bf16 box coordinates would be off by several pixels.
        with torch.autocast(self.device.type, enabled=False):
            last = hidden[-1].float()
            boxes = (model.bbox_embed[-1](last) + inverse_sigmoid(references[-2].float())).sigmoid()
            text["encoded_text"] = text["encoded_text"].float()
            logits = model.class_embed[-1](last, text)[..., : encoded.features.shape[1]]
        return logits, boxes

    def _score(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        encoded: EncodedCaption,
        box_floor: float,
        text_floor: float,
    ) -> torch.Tensor | None:
        """Every query scored on the device: (B, Q, 8) fp32 = keep, cx, cy, w, h, box_score, text_score,
        phrase index; None when the caption has no phrase token (nothing can be reported)."""
        if not encoded.has_phrase_tokens:
            return None
        probs = logits.sigmoid()  # (B, Q, T); padding tokens are -inf -> 0
        box_scores = probs.max(dim=-1).values
        phrase_tokens = encoded.phrase_tokens  # (C, T)
        in_phrase = phrase_tokens.any(dim=0)
        token_phrase = phrase_tokens.float().argmax(dim=0)  # (T,) phrase index of each phrase token
        best_token = probs.masked_fill(~in_phrase, -1.0).argmax(dim=-1)  # (B, Q)
        phrase = token_phrase[best_token]
        text_scores = probs.masked_fill(~phrase_tokens[phrase], 2.0).amin(dim=-1)
        # keep is 0/1 and phrase a small integer: both exact in fp32.
        keep = (box_scores > box_floor) & (text_scores > text_floor)
        return torch.cat(
            [
                keep[..., None].float(),
                boxes.float(),
                box_scores[..., None],
                text_scores[..., None],
                phrase[..., None].float(),
            ],
            dim=-1,
        ).contiguous()

    def _select(
        self,
        batch: Sequence[PreparedImage],
        scores: np.ndarray | None,
        encoded: EncodedCaption,
        query_offset: int = 0,
    ) -> list[Candidates]:
        """One caption's candidates per image of ``batch`` from its host ``scores`` (B, Q, 8) (see
        :meth:`_score`), boxes mapped to original pixels (xyxy, clipped). Survivors stay in query
        order; ``query_indices`` = ``query_offset`` + decoder query."""
        if scores is None:
            return [Candidates.empty(item.image_id, item.width, item.height) for item in batch]
        keep = scores[..., 0] > 0
        boxes, box_scores, text_scores = scores[..., 1:5], scores[..., 5], scores[..., 6]
        phrase = scores[..., 7].astype(np.int64)
        found = []
        for i, item in enumerate(batch):
            rows = np.flatnonzero(keep[i])
            size = np.array([item.width, item.height, item.width, item.height], np.float32)
            cx, cy, w, h = boxes[i, rows].T  # (N,) each, in [0, 1] of the unpadded image
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
