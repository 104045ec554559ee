"""OWLv2 and OWL-ViT (v1) open-vocabulary detection (transformers), batched, text queries encoded once.

``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection`` predict one box per image patch (P =
(S / patch)^2 boxes for an S x S input) and score it against every text query. ``forward`` re-runs
the text tower for every image; :class:`OwlDetector` calls the same submodules in two steps instead:

    _encode_queries  tokenizer + text tower, once per phrase (cached)          -> (Q, D) query embeddings
    detect           vision tower + heads, ONE forward per image batch          -> logits (B, P, Q),
                     boxes (B, P, 4) cxcywh in [0, 1] of the input, objectness (B, P) (OWLv2 only)

Each caption's phrases are its text queries (``"plant . flower ."`` -> "plant", "flower", used as
written: no "a photo of a" template). Inputs follow the released processors: OWLv2 pads the image
to a square (bottom/right, grey 0.5) and resizes it to S x S; OWL-ViT stretches it to S x S. Here
the image is resized on the CPU to its share of the square and padded on the device, and boxes are
mapped back through that exact resize to ORIGINAL image pixels (padding clipped away).

Scores kept per patch box and caption (any threshold above the floors can be applied later):

    box_score    OWLv2: the objectness head, sigmoid(objectness_logits): "is there an object here",
                 independent of the text. OWL-ViT v1 has no objectness head: the class score.
    text_score   OWLv2: the class score, sigmoid of the best query logit of the caption's phrases
                 (what ``post_process_object_detection`` thresholds). OWL-ViT v1: NaN ("not produced";
                 the text floor and text thresholds do not apply, the class score is the box score).
    phrase       the caption phrase with that best logit.
    query_index  caption_index * P + patch index (row-major over the patch grid): unique per image;
                 candidates are returned sorted by box score, ties by query index.

Every result of a batch crosses to the host in one copy (:class:`HostCopy`): no per-box syncs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import HubModel, resolve_pretrained_dir
from pseudolabel.models.interfaces import Candidates, PreparedImage, normalize_caption, phrases_of
from pseudolabel.models.loading import (
    OWLV2,
    OWLVIT,
    DetectorSpec,
    ModelConfigError,
    spec_identity,
    spec_runtime,
)
from pseudolabel.models.runtime import (
    FP32,
    HostCopy,
    ImageDecoding,
    describe_runtime,
    enable_tf32,
    inference,
    seeded,
)

# The processors' normalisation (OPENAI_CLIP_MEAN / _STD), used when a checkpoint directory has no
# preprocessor_config.json, and OWLv2's padding value in 0..1 units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_VALUE = 0.5


@dataclass(frozen=True)
class OwlVariant:
    """A released OWL checkpoint: where it lives and its architecture (for random full-size weights)."""

    hub: HubModel
    vision: dict[str, int]  # vision_config entries beyond the transformers defaults
    text: dict[str, int]  # text_config entries beyond the defaults
    projection_dim: int = 512


_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
_LARGE_TEXT = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
# Revisions: commits seen in public snapshot paths / pins (not checkable from here); "main" where none
# was found. Architectures as in the released config.json files.
OWL_VARIANTS: dict[str, dict[str, OwlVariant]] = {
    OWLV2: {
        "base-patch16-ensemble": OwlVariant(
            HubModel(
                "OWLv2 base-patch16-ensemble",
                "google/owlv2-base-patch16-ensemble",
                "cfd3195ba4ea9592eec887ded089f4c08eff231d",
            ),
            {**_BASE, "image_size": 960, "patch_size": 16},
            {},
        ),
        "base-patch16": OwlVariant(
            HubModel("OWLv2 base-patch16", "google/owlv2-base-patch16", "main"),
            {**_BASE, "image_size": 960, "patch_size": 16},
            {},
        ),
        "large-patch14-ensemble": OwlVariant(
            HubModel(
                "OWLv2 large-patch14-ensemble",
                "google/owlv2-large-patch14-ensemble",
                "d638f16c163f70a8b6bd643b2ddbfc8be2c34807",
            ),
            {**_LARGE, "image_size": 1008, "patch_size": 14},
            _LARGE_TEXT,
            768,
        ),
    },
    OWLVIT: {
        "base-patch32": OwlVariant(
            HubModel(
                "OWL-ViT base-patch32",
                "google/owlvit-base-patch32",
                "cbc355fb364588351c5d51c7f74465e8e7ec6f72",
            ),
            {**_BASE, "image_size": 768, "patch_size": 32},
            {},
        ),
        "base-patch16": OwlVariant(
            HubModel(
                "OWL-ViT base-patch16",
                "google/owlvit-base-patch16",
                "4b420debb9c806fc4caf9ecc8efb72208c0db892",
            ),
            {**_BASE, "image_size": 768, "patch_size": 16},
            {},
        ),
        "large-patch14": OwlVariant(
            HubModel("OWL-ViT large-patch14", "google/owlvit-large-patch14", "main"),
            {**_LARGE, "image_size": 840, "patch_size": 14},
            _LARGE_TEXT,
            768,
        ),
    },
}


def owl_variant(backend: str, variant: str) -> OwlVariant:
    """The released checkpoint ``backend`` ("owlv2" | "owlvit") + ``variant`` name, or a clear error."""
    if backend not in OWL_VARIANTS:
        raise ModelConfigError(f"load_owl builds {list(OWL_VARIANTS)}, not {backend!r}")
    variants = OWL_VARIANTS[backend]
    if variant not in variants:
        raise ModelConfigError(f"unknown {backend} variant {variant!r}; one of {list(variants)}")
    return variants[variant]


def load_owl(spec: DetectorSpec) -> OwlDetector:
    """The OWLv2 / OWL-ViT detector ``spec`` describes: weights resolved, model built and placed.

    ``checkpoint``: "" = the variant's hub repo at its pinned revision; a local ``save_pretrained``
    directory (model + tokenizer); an ``s3://`` prefix holding one; "random" = the variant's
    architecture (``tiny``: :func:`tiny.tiny_owl_config`) with seeded random weights and a locally
    generated CLIP tokenizer, no download (smoke runs).
    """
    variant = owl_variant(spec.backend, spec.variant)
    resolved = resolve_pretrained_dir(
        spec.checkpoint, variant.hub, cache_dir=spec.cache(), allow_download=spec.allow_download
    )
    device, precision = spec_runtime(spec, resolved)
    if resolved.path is None:
        model, tokenizer = build_random_owl(
            spec.backend, variant, tiny_size=spec.tiny, seed=spec.seed, image_size=spec.image_size
        )
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        model, tokenizer, (mean, std) = load_pretrained_owl(spec.backend, resolved.path)
    image_size = spec.image_size or model.config.vision_config.image_size
    info = {
        "model": spec.backend,
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        "image_size": image_size,
        "image_mean": [float(v) for v in mean],  # the checkpoint's preprocessor_config (CLIP's by default)
        "image_std": [float(v) for v in std],
        **spec_identity(spec, resolved),
    }
    return OwlDetector(
        model,
        tokenizer,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        image_size=image_size,
        image_mean=mean,
        image_std=std,
        decode_on_device=spec.decode_on_device,
        info=info,
    )


def _model_class(backend: str) -> type[nn.Module]:
    from transformers import Owlv2ForObjectDetection, OwlViTForObjectDetection

    return Owlv2ForObjectDetection if backend == OWLV2 else OwlViTForObjectDetection


def build_random_owl(
    backend: str,
    variant: OwlVariant,
    *,
    tiny_size: bool = False,
    seed: int = 0,
    image_size: int | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) with seeded random weights: the variant's architecture, or the tiny one.

    The tokenizer is :func:`tiny.write_clip_tokenizer_dir`'s (built in a scratch directory): the real
    CLIP vocabulary cannot be downloaded here and random weights make any vocabulary equally good.
    Full-size random weights keep transformers' init (std 1.0 Linears): their heads saturate (scores
    ~1.0, degenerate boxes), fine for timing, as the tiny config (see ``tiny_owl_config``) is for tests.
    """
    from transformers import CLIPTokenizer, Owlv2Config, OwlViTConfig

    with tempfile.TemporaryDirectory(prefix="owl-tokenizer-") as scratch:
        tokenizer = CLIPTokenizer.from_pretrained(tiny.write_clip_tokenizer_dir(scratch))
    if tiny_size:
        config = tiny.tiny_owl_config(backend, len(tokenizer), image_size or tiny.TINY_OWL_IMAGE_SIZE)
    else:
        vision = {**variant.vision, **({"image_size": image_size} if image_size else {})}
        config_class = Owlv2Config if backend == OWLV2 else OwlViTConfig
        config = config_class(
            text_config=variant.text, vision_config=vision, projection_dim=variant.projection_dim
        )
    with seeded(seed):
        model = _model_class(backend)(config)
    return model.eval(), tokenizer


def load_pretrained_owl(backend: str, path: Path) -> tuple[nn.Module, Any, tuple[tuple, tuple]]:
    """(model, tokenizer, (image_mean, image_std)) from a ``save_pretrained`` directory of ``backend``."""
    from transformers import AutoConfig, AutoTokenizer

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != backend:
        raise ModelConfigError(f"{path} holds a {model_type!r} model, but the backend is {backend!r}")
    model = _model_class(backend).from_pretrained(path).float().eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path} has no usable tokenizer (vocab.json, merges.txt): {exc}") from exc
    processor = path / "preprocessor_config.json"
    settings = json.loads(processor.read_text()) if processor.is_file() else {}
    mean = tuple(settings.get("image_mean", CLIP_MEAN))
    std = tuple(settings.get("image_std", CLIP_STD))
    return model, tokenizer, (mean, std)


@dataclass(frozen=True)
class EncodedQueries:
    """The text queries of a list of captions, computed once. Q = all captions' phrases."""

    embeds: torch.Tensor  # (Q, D) text tower + projection
    phrases: list[str]  # (Q,)
    spans: list[tuple[int, int]]  # (C,) each caption's [start, end) in the Q queries


class OwlDetector:
    """Runs an OWLv2 / OWL-ViT detection model on batches of images against text queries.

    Arguments:
      model: a built ``Owlv2ForObjectDetection`` or ``OwlViTForObjectDetection``.
      tokenizer: its CLIP tokenizer (pad token id 0, as released).
      device, precision: where and how to run (precision "bf16" = autocast of the vision tower; the
        heads run in fp32).
      batch_size: images per forward pass.
      image_size: the square input side S (default: the model's own; other multiples of the patch
        size interpolate the position embeddings).
      image_mean, image_std: the processor's normalisation (0..1 units).
      decode_on_device: decode each batch's JPEGs on ``device`` in one call and resize them there
        (:class:`ImageDecoding`) instead of decoding + resizing in the CPU workers (opt-in).
      info: identity for metadata (backend, variant, checkpoint digest, ...), returned by :meth:`describe`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        precision: str = FP32,
        batch_size: int = 8,
        image_size: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        decode_on_device: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        enable_tf32(device)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        vision = model.config.vision_config
        self.image_size = image_size or vision.image_size
        if self.image_size % vision.patch_size:
            raise ModelConfigError(
                f"image_size {self.image_size} is not a multiple of the patch size {vision.patch_size}"
            )
        self._interpolate = self.image_size != vision.image_size
        self.grid = self.image_size // vision.patch_size  # patches per side
        # OWLv2 pads to a square (and has an objectness head); OWL-ViT v1 stretches.
        self.pads_to_square = hasattr(model, "objectness_head")
        self.max_text_length = model.config.text_config.max_position_embeddings
        self._info = dict(info or {})
        self.decoding = ImageDecoding(device, decode_on_device)
        mean = torch.tensor(image_mean, dtype=torch.float32, device=device).view(3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32, device=device).view(3, 1, 1)
        # Normalisation folded into one affine map of the 0..255 input (padding included).
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        # The box centre / size prior of each patch (what box_predictor adds), on the device once.
        self._box_bias = model.compute_box_bias(self.grid, self.grid).to(device)
        self._phrase_embeds: dict[str, torch.Tensor] = {}
        self._queries: dict[tuple[str, ...], EncodedQueries] = {}

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def describe(self) -> dict[str, Any]:
        layout = "padded to a square" if self.pads_to_square else "stretched to a square"
        described = describe_runtime(
            self._info,
            self.device,
            self.precision,
            self.batch_size,
            f"{self.image_size}x{self.image_size} {layout}",
        )
        if self.decoding.on_device:  # only when on: default runs keep their earlier fingerprints
            described["decode_on_device"] = True
        return described

    # ---- CPU side (background workers) ---------------------------------------------------------

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) the image is resized to: its share of the padded S x S square (OWLv2), or S x S."""
        side = self.image_size
        if not self.pads_to_square:
            return side, side
        scale = side / max(width, height)
        return min(side, max(1, round(width * scale))), min(side, max(1, round(height * scale)))

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        """Decode + resize one image. ``pixels``: (3, h, w) uint8 (see :meth:`input_size`), pinned on CUDA;
        with ``decode_on_device`` the still-encoded JPEG, decoded with its batch on the device."""
        return self.decoding.prepare(image_id, data, self.input_size)

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
        """Per image, every (caption, patch) box with ``box_score > box_floor`` and ``text_score >
        text_floor`` (the text floor is ignored where the text score is NaN), the ``max_candidates``
        best by box score, best first. One forward and one host copy for the whole batch."""
        if not batch:
            return []
        if not captions:
            return [Candidates.empty(item.image_id, item.width, item.height) for item in batch]
        batch = self.decoding.decoded(batch)
        queries = self._encode_queries(captions)
        with inference(self.device, self.precision):
            logits, boxes, objectness = self._predict(self._pixel_batch(batch), queries)
            packed = self._select_on_device(
                logits, boxes, objectness, queries, box_floor, text_floor, max_candidates
            )
        if packed is None:
            return [Candidates.empty(item.image_id, item.width, item.height) for item in batch]
        values, indices = HostCopy(packed).wait()
        return [self._candidates(item, values[i], indices[i], queries) for i, item in enumerate(batch)]

    def predict(
        self, batch: Sequence[PreparedImage], captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw outputs: logits (B, P, Q) over all captions' phrases, boxes (B, P, 4) cxcywh in [0, 1]
        of the S x S input, objectness logits (B, P) or None (OWL-ViT). For parity checks."""
        queries = self._encode_queries(captions)
        with inference(self.device, self.precision):
            return self._predict(self._pixel_batch(self.decoding.decoded(batch)), queries)

    def pixel_batch(self, batch: Sequence[PreparedImage]) -> torch.Tensor:
        """The normalised (B, 3, S, S) model input (exposed for parity checks)."""
        with inference(self.device, self.precision):
            return self._pixel_batch(self.decoding.decoded(batch))

    def _encode_queries(self, captions: Sequence[str]) -> EncodedQueries:
        """The captions' phrases through the text tower (fp32), each phrase once per detector (cached)."""
        key = tuple(normalize_caption(caption) for caption in captions)
        if key in self._queries:
            return self._queries[key]
        per_caption = [phrases_of(caption) for caption in key]
        phrases = [phrase for caption in per_caption for phrase in caption]
        new = [phrase for phrase in dict.fromkeys(phrases) if phrase not in self._phrase_embeds]
        if new:
            tokens = self.tokenizer(
                new,
                padding="max_length",
                max_length=self.max_text_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            tower = getattr(self.model, self.model.base_model_prefix)
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
                embeds = tower.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            self._phrase_embeds.update(zip(new, embeds, strict=True))
        bounds = np.cumsum([0] + [len(caption) for caption in per_caption])
        encoded = EncodedQueries(
            embeds=torch.stack([self._phrase_embeds[phrase] for phrase in phrases]),
            phrases=phrases,
            spans=[(int(start), int(end)) for start, end in zip(bounds[:-1], bounds[1:], strict=True)],
        )
        self._queries[key] = encoded
        return encoded

    def _pixel_batch(self, batch: Sequence[PreparedImage]) -> torch.Tensor:
        """(B, 3, S, S) normalised: each image top-left, the rest OWLv2's grey padding."""
        side = self.image_size
        canvas = torch.full((len(batch), 3, side, side), 255.0 * PAD_VALUE, device=self.device)
        for i, item in enumerate(batch):
            _, h, w = item.pixels.shape
            canvas[i, :, :h, :w] = item.pixels.to(self.device, non_blocking=True).float()
        return canvas * self._scale - self._shift

    def _predict(
        self, pixels: torch.Tensor, queries: EncodedQueries
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The vision tower on the batch, then the class, box and objectness heads in fp32 (the same
        calls as ``forward``, with the text embeddings from the cache)."""
        model = self.model
        feature_map, _ = model.image_embedder(pixel_values=pixels, interpolate_pos_encoding=self._interpolate)
        batch = feature_map.shape[0]
        with torch.autocast(self.device.type, enabled=False):
            features = feature_map.float().reshape(batch, self.num_patches, -1)  # (B, P, D)
            logits, _ = model.class_predictor(features, queries.embeds.float().expand(batch, -1, -1))
            boxes = (model.box_head(features) + self._box_bias).sigmoid()
            objectness = model.objectness_predictor(features) if self.pads_to_square else None
        return logits, boxes, objectness

    def _select_on_device(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        objectness: torch.Tensor | None,
        queries: EncodedQueries,
        box_floor: float,
        text_floor: float,
        max_candidates: int,
    ) -> list[torch.Tensor] | None:
        """Score every (caption, patch) and keep the best ``max_candidates`` per image, on the device:
        [(B, K, 8) fp32 = kept, cx, cy, w, h, box_score, text_score, query (phrase index), (B, K)
        int64 caption * P + patch]; None when nothing is asked for."""
        if not queries.spans or max_candidates <= 0:
            return None
        patches = self.num_patches
        best, phrase = [], []
        for start, end in queries.spans:  # each caption: its best phrase per patch
            values, index = logits[..., start:end].max(dim=-1)  # (B, P)
            best.append(values)
            phrase.append(index + start)
        class_scores = torch.stack(best, dim=1).sigmoid()  # (B, C, P)
        phrase_index = torch.stack(phrase, dim=1)
        if objectness is not None:
            box_scores = objectness.sigmoid()[:, None, :].expand_as(class_scores)
            text_scores = class_scores
            keep = (box_scores > box_floor) & (text_scores > text_floor)
        else:  # OWL-ViT v1: the class score is the only score
            box_scores = class_scores
            text_scores = torch.full_like(class_scores, float("nan"))
            keep = box_scores > box_floor
        batch = class_scores.shape[0]
        flat = lambda values: values.reshape(batch, -1)  # noqa: E731  (B, C * P): column = caption * P + patch
        ranking = torch.where(flat(keep), flat(box_scores), float("-inf"))
        k = min(max_candidates, ranking.shape[1])
        top_scores, top = ranking.topk(k, dim=1)  # (B, K), best first
        patch = top % patches
        columns = torch.cat(
            [
                torch.isfinite(top_scores)[..., None].float(),
                boxes.float().gather(1, patch[..., None].expand(-1, -1, 4)),
                flat(box_scores).gather(1, top)[..., None],
                flat(text_scores).gather(1, top)[..., None],
                flat(phrase_index).gather(1, top)[..., None].float(),
            ],
            dim=-1,
        ).contiguous()
        return [columns, top.contiguous()]

    def _candidates(
        self, item: PreparedImage, values: np.ndarray, queries_index: np.ndarray, queries: EncodedQueries
    ) -> Candidates:
        """One image's host rows (K, 8) + (K,) (see :meth:`_select_on_device`) as Candidates with boxes in
        original pixels: normalised input coordinates * S, divided by the resize factor of each axis."""
        rows = np.flatnonzero(values[:, 0] > 0)
        box_scores = values[rows, 5]
        query_indices = queries_index[rows]
        order = rows[np.lexsort((query_indices, -box_scores))]  # box score descending, ties by query
        _, resized_h, resized_w = item.pixels.shape
        side = self.image_size
        scale = (
            np.array(
                [
                    item.width / resized_w,
                    item.height / resized_h,
                    item.width / resized_w,
                    item.height / resized_h,
                ],
                np.float64,
            )
            * side
        )
        cx, cy, w, h = values[order, 1:5].astype(np.float64).T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * scale
        limits = np.array([item.width, item.height, item.width, item.height], np.float64)
        return Candidates(
            item.image_id,
            item.width,
            item.height,
            boxes=np.clip(xyxy, 0, limits).astype(np.float32).reshape(-1, 4),
            box_scores=values[order, 5].astype(np.float32),
            text_scores=values[order, 6].astype(np.float32),
            phrases=[queries.phrases[int(p)] for p in values[order, 7]],
            query_indices=queries_index[order].astype(np.int32),
        )
