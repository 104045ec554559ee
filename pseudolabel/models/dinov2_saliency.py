"""Prompt-free detection: DINOv2's CLS attention -> salient regions -> boxes and centre clicks.

No text goes in: ``captions`` are accepted (the :class:`~pseudolabel.models.interfaces.Detector`
protocol) and ignored. Per batch of B images (each resized to h x w patches of 14 px):

    forward    Dinov2Model embeddings + all layers but the last (any attention kernel, e.g. SDPA)
    attention  the last layer's CLS query against every key, softmax in fp32, per head -> (B, heads, h, w)
    saliency   mean over heads, scaled so the maximum is 1, bilinear to the ORIGINAL H x W
    regions    :func:`regions_from_saliency`: foreground by the mass rule, connected components,
               ``min_area`` filter, the ``num_objects`` heaviest

Why the last layer's CLS->patch attention, averaged over heads: the DINO papers show that the CLS
token's last-layer attention of a self-supervised ViT segments the salient objects without any label
(Caron et al. 2021, fig. 1; their ``visualize_attention.py`` thresholds it so that the kept patches hold
60 % of the mass, the rule used here). DINO shows each head separately; heads specialise (one object,
one part), so the mean gives one map per image that covers what any head attends to strongly. Known
limits and alternatives: DINOv2 without registers puts high-norm "artifact" tokens on a few background
patches that also draw the CLS attention (Darcet et al. 2024, "Vision Transformers Need Registers"),
strongest in large/giant; a checkpoint of ``Dinov2WithRegistersModel`` (a local directory / s3 prefix)
loads here as well and gives cleaner maps; ``min_area`` drops most single-patch specks. Other region
sources are the max over heads, a union of per-head masks, or patch-feature methods (first principal
component of the patch features as in the DINOv2 paper, LOST, TokenCut's normalised cut), which need
more compute per image and are not implemented.

Only the last layer's attention row of the CLS token is computed here (``_cls_attention``): the
released ``output_attentions=True`` path needs the eager kernel in every layer and returns all
(B, heads, N, N) maps; ``tests/worker/test_dinov2_saliency.py`` checks that both give the same numbers.

Mixed input sizes: ``Dinov2Model`` has no key-padding mask, and its position embeddings are
interpolated to the input size, so padding would change the result. A batch therefore runs one forward
per distinct input shape (the detection stage orders images by aspect ratio, so a batch has one or two).

Scores per candidate (= region):

    box_score    the region's share of the image's attention mass (sum of the saliency map inside the
                 region / over the image), in (0, 1); regions together hold about ``attention_threshold``
    text_score   NaN: no text, so text thresholds do not apply
    phrase       "object"
    query_index  0..n-1 in box-score order (the order the regions are emitted in)

Prompts (``prompt_mode``): "box" = the region's box; "point" = one positive click at the region's
centre (the attention-weighted centroid, or the region's attention peak when the centroid falls outside
the region) with ``box_prompt`` False; "box+point" = both. Random weights make the maps, and so the
regions, meaningless: such runs are smoke runs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from pseudolabel.models.checkpoints import HubModel, resolve_pretrained_dir
from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import (
    DINOV2_SALIENCY,
    PROMPT_MODES,
    DetectorSpec,
    ModelConfigError,
    spec_identity,
    spec_runtime,
)
from pseudolabel.models.runtime import (
    FP32,
    HostCopy,
    describe_runtime,
    enable_tf32,
    inference,
    normalization,
    prepare_image,
    seeded,
)
from pseudolabel.models.tiny import TINY_DINOV2, TINY_DINOV2_IMAGE_SIZE, TINY_DINOV2_MAX_SIZE

PHRASE = "object"
DEFAULT_IMAGE_SIZE = 448  # short side: 32 patches of 14 px
DEFAULT_MAX_SIZE = 896  # long-side cap: 64 patches

# Official checkpoints, pinned to a hub commit (the revisions pinned by the MTEB benchmark and several
# independent projects; a moving "main" would silently change every label).
HUB_MODELS: dict[str, HubModel] = {
    "small": HubModel("DINOv2 ViT-S/14", "facebook/dinov2-small", "ed25f3a31f01632728cabb09d1542f84ab7b0056"),
    "base": HubModel("DINOv2 ViT-B/14", "facebook/dinov2-base", "f9e44c814b77203eaa57a6bdbbd535f21ede1415"),
    "large": HubModel("DINOv2 ViT-L/14", "facebook/dinov2-large", "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c"),
    "giant": HubModel("DINOv2 ViT-g/14", "facebook/dinov2-giant", "611a9d42f2335e0f921f1e313ad3c1b7178d206d"),
}
MODEL_TYPES = ("dinov2", "dinov2_with_registers")  # config.model_type of the checkpoints this reads
# The released architectures (their hub config.json), for random-weight runs at full size.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "use_swiglu_ffn": True,
    },
}


# ---- building --------------------------------------------------------------------------------------


def load_dinov2_saliency(spec: DetectorSpec) -> Dinov2SaliencyDetector:
    """The detector ``spec`` describes: weights resolved (hub at a pinned revision, local directory,
    s3 prefix, or "random"), model built and placed, region knobs from the spec."""
    # Refuse bad knobs before any download.
    check_settings(spec.num_objects, spec.attention_threshold, spec.min_area, spec.prompt_mode)
    hub = HUB_MODELS[spec.variant]
    resolved = resolve_pretrained_dir(
        spec.checkpoint, hub, cache_dir=spec.cache(), allow_download=spec.allow_download
    )
    device, precision = spec_runtime(spec, resolved)
    model = build_dinov2(spec.variant, resolved.path, tiny=spec.tiny, seed=spec.seed)
    info = {
        "model": DINOV2_SALIENCY,
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        "architecture": type(model).__name__,
        **spec_identity(spec, resolved),
    }
    return Dinov2SaliencyDetector(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        image_size=spec.image_size or (TINY_DINOV2_IMAGE_SIZE if spec.tiny else DEFAULT_IMAGE_SIZE),
        max_size=spec.max_size or (TINY_DINOV2_MAX_SIZE if spec.tiny else DEFAULT_MAX_SIZE),
        num_objects=spec.num_objects,
        attention_threshold=spec.attention_threshold,
        min_area=spec.min_area,
        prompt_mode=spec.prompt_mode,
        info=info,
    )


def check_settings(num_objects: int, attention_threshold: float, min_area: float, prompt_mode: str) -> None:
    """The region knobs' ranges; :class:`ModelConfigError` naming the knob otherwise."""
    if num_objects < 1:
        raise ModelConfigError(f"num_objects must be >= 1, got {num_objects}")
    if not 0 < attention_threshold <= 1:
        raise ModelConfigError(
            f"attention_threshold is a share of the attention mass in (0, 1], got {attention_threshold}"
        )
    if not 0 <= min_area < 1:
        raise ModelConfigError(f"min_area is a fraction of the image in [0, 1), got {min_area}")
    if prompt_mode not in PROMPT_MODES:
        raise ModelConfigError(f"prompt_mode must be one of {list(PROMPT_MODES)}, got {prompt_mode!r}")


def build_dinov2(variant: str, checkpoint: Path | None, *, tiny: bool = False, seed: int = 0) -> nn.Module:
    """A ``from_pretrained`` directory's model (``Dinov2Model`` or ``Dinov2WithRegistersModel``), or,
    for ``checkpoint=None``, the variant's architecture (``tiny``: :data:`TINY_DINOV2`) with a
    seeded random init. SDPA attention: the saliency needs no attention weights from the model."""
    from transformers import AutoModel, Dinov2Config, Dinov2Model

    if checkpoint is not None:
        model = AutoModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
        if model.config.model_type not in MODEL_TYPES:
            raise ModelConfigError(
                f"{checkpoint} holds a {model.config.model_type!r} model; dinov2_saliency needs one of "
                f"{list(MODEL_TYPES)} (e.g. a save_pretrained() copy of facebook/dinov2-small)"
            )
        return model
    if variant not in ARCHITECTURES:
        raise ValueError(f"unknown DINOv2 variant {variant!r}; expected one of {sorted(ARCHITECTURES)}")
    settings = TINY_DINOV2 if tiny else {**ARCHITECTURES[variant], "image_size": 518}
    config = Dinov2Config(**settings, attn_implementation="sdpa")
    with seeded(seed):
        return Dinov2Model(config).eval()


def input_size(width: int, height: int, short_side: int, max_size: int, patch: int) -> tuple[int, int]:
    """(w, h) of the model input: short side ``short_side`` unless the long side would pass ``max_size``,
    each side then rounded to a multiple of ``patch`` (at least one patch, at most ``max_size``)."""
    scale = short_side / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    cap = max(1, max_size // patch)
    patches = lambda side: max(1, min(cap, round(side * scale / patch)))  # noqa: E731
    return patches(width) * patch, patches(height) * patch


# ---- regions from a saliency map (pure numpy + OpenCV) ---------------------------------------------


@dataclass(frozen=True)
class SalientRegions:
    """K regions of a saliency map, heaviest first, in the map's pixel frame."""

    boxes: np.ndarray  # (K, 4) float32 xyxy; x1/y1 are pixel edges (last column/row + 1)
    points: np.ndarray  # (K, 2) float32 (x, y) pixel indices of the centre click, inside the region
    mass: np.ndarray  # (K,) float32 share of the map's total mass inside the region
    areas: np.ndarray  # (K,) int64 pixels


def mass_cutoff(values: np.ndarray, mass: float) -> float:
    """The value v such that ``values >= v`` is the smallest set holding at least ``mass`` of the total
    (DINO's rule; ties at v are all kept). ``values`` must be >= 0 with a positive sum."""
    ordered = np.sort(values, axis=None)[::-1].astype(np.float64)
    cumulative = np.cumsum(ordered)
    index = int(np.searchsorted(cumulative, mass * cumulative[-1] * (1 - 1e-9), side="left"))
    return float(ordered[min(index, len(ordered) - 1)])


def regions_from_saliency(
    saliency: np.ndarray,
    *,
    attention_threshold: float = 0.6,
    min_area: float = 0.01,
    num_objects: int = 5,
    grid: np.ndarray | None = None,
) -> SalientRegions:
    """Salient regions of an (H, W) map of non-negative values.

    Foreground: pixels at or above :func:`mass_cutoff` of ``grid`` (the patch-level map the saliency was
    upsampled from, on the same scale; default: ``saliency`` itself) for ``attention_threshold``.
    Regions: its 8-connected components, those with at least ``min_area`` * H * W pixels, the
    ``num_objects`` holding the most mass (ties: top-left first). Box: the component's extent. Point: the
    saliency-weighted centroid, or the component's peak when the rounded centroid is not in it.
    """
    saliency = np.asarray(saliency, np.float32)
    height, width = saliency.shape
    total = float(saliency.sum(dtype=np.float64))
    empty = SalientRegions(
        np.zeros((0, 4), np.float32),
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.int64),
    )
    if total <= 0 or num_objects < 1:
        return empty
    cutoff = mass_cutoff(saliency if grid is None else grid, attention_threshold)
    foreground = (saliency >= cutoff).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    # Mass per component (label 0 = background) in one pass.
    mass = np.bincount(labels.ravel(), weights=saliency.ravel().astype(np.float64), minlength=count)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    candidates = [k for k in range(1, count) if areas[k] >= min_area * height * width and mass[k] > 0]
    # Heaviest first; stable, so equal masses keep label (raster scan) order.
    chosen = sorted(candidates, key=lambda k: -mass[k])[:num_objects]
    if not chosen:
        return empty
    boxes, points = [], []
    for k in chosen:
        left, top = int(stats[k, cv2.CC_STAT_LEFT]), int(stats[k, cv2.CC_STAT_TOP])
        right, bottom = left + int(stats[k, cv2.CC_STAT_WIDTH]), top + int(stats[k, cv2.CC_STAT_HEIGHT])
        boxes.append((left, top, right, bottom))
        # Centroid inside the box only: the region's weights, zero elsewhere.
        inside = labels[top:bottom, left:right] == k
        weights = np.where(inside, saliency[top:bottom, left:right], 0.0).astype(np.float64)
        rows, cols = weights.sum(axis=1), weights.sum(axis=0)
        cx = float(cols @ np.arange(right - left)) / mass[k]
        cy = float(rows @ np.arange(bottom - top)) / mass[k]
        if not inside[int(round(cy)), int(round(cx))]:  # e.g. a ring or crescent: centroid outside
            cy, cx = np.unravel_index(int(np.argmax(np.where(inside, weights, -1.0))), inside.shape)
        points.append((left + float(cx), top + float(cy)))
    return SalientRegions(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        points=np.asarray(points, np.float32).reshape(-1, 2),
        mass=np.asarray([mass[k] / total for k in chosen], np.float32),
        areas=areas[chosen],
    )


# ---- the detector ----------------------------------------------------------------------------------


class Dinov2SaliencyDetector:
    """Prompt-free detector: salient regions of DINOv2's last-layer CLS attention (see module docstring).

    Arguments:
      model: a transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``), any attention kernel.
      device, precision: where and how to run (precision "bf16" = autocast; the attention row is fp32).
      batch_size: images per batch (one forward per distinct input shape in it).
      image_size, max_size: input short side and long-side cap, both sides rounded to whole patches.
      num_objects, attention_threshold, min_area: the region rule (:func:`regions_from_saliency`).
      prompt_mode: "box", "point" or "box+point": what the segmenter gets per region.
      info: identity for metadata (variant, checkpoint digest, ...), returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        precision: str = FP32,
        batch_size: int = 8,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        num_objects: int = 5,
        attention_threshold: float = 0.6,
        min_area: float = 0.01,
        prompt_mode: str = "box",
        info: dict[str, Any] | None = None,
    ) -> None:
        check_settings(num_objects, attention_threshold, min_area, prompt_mode)
        enable_tf32(device)
        self.model = model.to(device).eval()
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.image_size = image_size
        self.max_size = max_size
        self.num_objects = num_objects
        self.attention_threshold = attention_threshold
        self.min_area = min_area
        self.prompt_mode = prompt_mode
        config = model.config
        self.patch_size = int(config.patch_size)
        # Token layout: [CLS, registers..., patches] (no registers in the original DINOv2).
        self.first_patch = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self._info = dict(info or {})
        self._scale, self._shift = normalization(device)

    def describe(self) -> dict[str, Any]:
        info = {
            **self._info,
            "captions": "ignored (prompt-free)",
            "saliency": "last-layer CLS->patch attention, mean over heads",
            "num_objects": self.num_objects,
            "attention_threshold": self.attention_threshold,
            "min_area": self.min_area,
            "prompt_mode": self.prompt_mode,
        }
        size = f"short {self.image_size} / max {self.max_size}, multiple of {self.patch_size}"
        return describe_runtime(info, self.device, self.precision, self.batch_size, size)

    # ---- CPU side (background workers) ---------------------------------------------------------

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + resize one JPEG. ``pixels``: (3, h, w) uint8, h and w multiples of the patch size."""
        target = lambda w, h: input_size(w, h, self.image_size, self.max_size, self.patch_size)  # noqa: E731
        return prepare_image(image_id, data, target, self.device)

    # ---- accelerator side --------------------------------------------------------------------------

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str] = (),
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        """Salient regions per image (see :meth:`detect_with_maps`); ``captions`` are ignored."""
        found, _ = self.detect_with_maps(
            batch, captions, box_floor=box_floor, text_floor=text_floor, max_candidates=max_candidates
        )
        return found

    def detect_with_maps(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str] = (),
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> tuple[list[Candidates], list[np.ndarray]]:
        """Candidates per image and its saliency map: float32 (H, W) at the ORIGINAL size in [0, 1].

        At most ``min(num_objects, max_candidates)`` regions per image with ``box_score > box_floor``,
        heaviest first. ``captions`` and ``text_floor`` are ignored (prompt-free; text scores are NaN).
        """
        del captions, text_floor  # prompt-free: nothing to match text against
        if not batch:
            return [], []
        grids = self.patch_saliency(batch)
        limit = min(self.num_objects, max_candidates)
        found, maps = [], []
        for item, grid in zip(batch, grids, strict=True):
            candidates, saliency = self._candidates(item, grid, box_floor, limit)
            found.append(candidates)
            maps.append(saliency)
        return found, maps

    def patch_saliency(self, batch: Sequence[PreparedImage]) -> list[np.ndarray]:
        """Per image, the (h, w) float32 patch map: CLS attention averaged over heads (sums to < 1, the
        rest goes to the CLS token itself and to registers). One host synchronisation per batch."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(batch):
            groups.setdefault(tuple(item.pixels.shape), []).append(index)
        with inference(self.device, self.precision):
            maps = []
            for indices in groups.values():
                pixels = torch.stack([batch[i].pixels.to(self.device, non_blocking=True) for i in indices])
                maps.append(
                    self.cls_attention(pixels.float() * self._scale - self._shift).mean(1).contiguous()
                )
            host = HostCopy(maps).wait()
        grids: list[np.ndarray] = [np.empty(0)] * len(batch)
        for indices, values in zip(groups.values(), host, strict=True):
            for row, index in enumerate(indices):
                grids[index] = values[row]
        return grids

    def cls_attention(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) pixels, H and W multiples of the patch size -> the last layer's
        attention of the CLS query on each patch, (B, heads, H / patch, W / patch) fp32."""
        batch, _, height, width = pixels.shape
        model: Any = self.model
        hidden = model.embeddings(pixels)
        layers = model.encoder.layer
        for layer in layers[:-1]:
            output = layer(hidden)
            hidden = output[0] if isinstance(output, tuple) else output
        last = layers[-1]
        attention = last.attention.attention  # Dinov2SelfAttention: query/key projections, scaling
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        with torch.autocast(self.device.type, enabled=False):
            tokens = last.norm1(hidden.float())
            query = attention.query(tokens[:, :1]).view(batch, 1, heads, head_size).transpose(1, 2)
            keys = attention.key(tokens).view(batch, -1, heads, head_size).transpose(1, 2)
            weights = ((query @ keys.transpose(-1, -2)) * attention.scaling).softmax(-1)  # (B, heads, 1, N)
        patches = weights[:, :, 0, self.first_patch :]
        return patches.reshape(batch, heads, height // self.patch_size, width // self.patch_size)

    def _candidates(
        self, item: PreparedImage, grid: np.ndarray, box_floor: float, limit: int
    ) -> tuple[Candidates, np.ndarray]:
        peak = float(grid.max())
        grid = grid / peak if peak > 0 else np.zeros_like(grid)
        # Bilinear, half-pixel centres: the patch grid covers the whole (resized, uncropped) image.
        saliency = cv2.resize(grid, (item.width, item.height), interpolation=cv2.INTER_LINEAR)
        saliency = np.clip(saliency, 0.0, 1.0).astype(np.float32, copy=False)
        regions = regions_from_saliency(
            saliency,
            attention_threshold=self.attention_threshold,
            min_area=self.min_area,
            num_objects=limit,
            grid=grid,
        )
        keep = regions.mass > box_floor
        count = int(keep.sum())
        found = Candidates(
            item.image_id,
            item.width,
            item.height,
            boxes=regions.boxes[keep],
            box_scores=regions.mass[keep],
            text_scores=np.full(count, np.nan, np.float32),
            phrases=[PHRASE] * count,
            query_indices=np.arange(count, dtype=np.int32),
        )
        if count and self.prompt_mode != "box":
            points = regions.points[keep].reshape(count, 1, 2)
            found = found.with_prompts(
                points, np.ones((count, 1), np.int8), np.full(count, self.prompt_mode != "point")
            )
        return found, saliency
