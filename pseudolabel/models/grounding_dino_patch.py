"""groundingdino-py's transformer without host synchronisation.

groundingdino's transformer keeps the (h, w) of its feature levels in a (L, 2) device tensor and
iterates over it wherever it needs them as numbers: every ``H_ * W_`` or ``linspace(..., H_)`` is a
device->host read. In one forward: the proposals of the two-stage encoder (~5 reads per level), the
encoder's reference points (4 per level), a shape ``assert`` in every deformable attention call
(12 calls) and the pure-PyTorch deformable attention (3 reads per level per call; groundingdino-py
installs no compiled op). Its decoder also checks every layer's output with
``if output.isnan().any() | output.isinf().any()`` (a read per layer, 6 per forward, that only
prints). :func:`install` replaces those five places by versions that take the sizes as Python ints,
recorded from the feature maps' shapes by :func:`spatial_shapes` while a batch runs (a tensor is read
once when nothing fitting was recorded), and a decoder loop without the check. Same operations in the
same order, so the same results (``tests/worker/test_grounding_dino.py`` compares the whole model,
and each piece, with groundingdino's own, bit for bit).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Shapes = Sequence[tuple[int, int]]

# The (h, w) of each feature level of the batch being run, as Python ints (set by ``spatial_shapes``).
_SHAPES: contextvars.ContextVar[tuple[tuple[int, int], ...] | None] = contextvars.ContextVar(
    "grounding_dino_spatial_shapes", default=None
)


@contextlib.contextmanager
def spatial_shapes(sources: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make the sizes of the feature levels ``sources`` [(B, C, h, w)...] (host metadata, no sync)
    known to the patched functions while the transformer runs on them."""
    token = _SHAPES.set(tuple((int(s.shape[-2]), int(s.shape[-1])) for s in sources))
    try:
        yield
    finally:
        _SHAPES.reset(token)


def host_shapes(shapes: torch.Tensor | Shapes, total: int | None = None) -> list[tuple[int, int]]:
    """The level sizes ``shapes`` stands for, as ints: the recorded ones when they fit (same number of
    levels and, when ``total`` is given, h * w summing to it), else read from the tensor (one sync)."""
    if not isinstance(shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in shapes]
    recorded = _SHAPES.get()
    if (
        recorded is not None
        and len(recorded) == shapes.shape[0]
        and (total is None or sum(h * w for h, w in recorded) == total)
    ):
        return list(recorded)
    return [(h, w) for h, w in shapes.tolist()]


def deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """groundingdino's ``multi_scale_deformable_attn_pytorch`` with the level sizes as Python ints.

    Shapes: value (B, sum h*w, heads, d); sampling_locations (B, Q, heads, L, P, 2) in [0, 1];
    attention_weights (B, Q, heads, L, P) -> (B, Q, heads * d).
    """
    shapes = host_shapes(spatial_shapes, value.shape[1])
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, heads, d) -> (B*heads, d, h, w)
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, embed_dims, h, w)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*heads, d, Q, P)
    attention_weights = attention_weights.transpose(1, 2).reshape(
        bs * num_heads, 1, num_queries, num_levels * num_points
    )
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(bs, num_heads * embed_dims, num_queries)
    )
    return output.transpose(1, 2).contiguous()


def deformable_attention_forward(
    self: Any,
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    reference_points: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    level_start_index: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``MultiScaleDeformableAttention.forward`` whose shape check uses the host sizes (groundingdino's
    ``assert`` read the device). query (Q, B, C) or (B, Q, C) with ``batch_first``; reference_points
    (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised; spatial_shapes (L, 2) on the device."""
    if value is None:
        value = query
    if query_pos is not None:
        query = query + query_pos
    if not self.batch_first:
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
    bs, num_query, _ = query.shape
    _, num_value, _ = value.shape
    shapes = host_shapes(spatial_shapes, num_value)
    if sum(h * w for h, w in shapes) != num_value:
        raise ValueError(
            f"feature levels {shapes} hold {sum(h * w for h, w in shapes)} values, not {num_value}"
        )
    value = self.value_proj(value)
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], float(0))
    value = value.view(bs, num_value, self.num_heads, -1)
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
    weights = self.attention_weights(query).view(bs, num_query, heads, levels * points).softmax(-1)
    weights = weights.view(bs, num_query, heads, levels, points)
    if reference_points.shape[-1] == 2:  # points: offsets in pixels of each level ((w, h), on the device)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
    elif reference_points.shape[-1] == 4:  # boxes: offsets relative to each box's half size
        locations = (
            reference_points[:, :, None, :, None, :2]
            + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    else:
        raise ValueError(f"reference_points end in 2 (points) or 4 (boxes), not {reference_points.shape[-1]}")
    output = self.output_proj(deformable_attention(value, shapes, locations, weights))
    return output if self.batch_first else output.permute(1, 0, 2)


def decoder_forward(
    self: Any,
    tgt: torch.Tensor,
    memory: torch.Tensor,
    tgt_mask: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
    tgt_key_padding_mask: torch.Tensor | None = None,
    memory_key_padding_mask: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    refpoints_unsigmoid: torch.Tensor | None = None,
    level_start_index: torch.Tensor | None = None,
    spatial_shapes: torch.Tensor | None = None,
    valid_ratios: torch.Tensor | None = None,
    memory_text: torch.Tensor | None = None,
    text_attention_mask: torch.Tensor | None = None,
) -> list[list[torch.Tensor]]:
    """``TransformerDecoder.forward`` without the per-layer NaN/inf check. tgt (Q, B, C), memory
    (HW, B, C), refpoints_unsigmoid (Q, B, 2 | 4) -> [per layer the normed output (B, Q, C)],
    [the initial and each layer's reference points (B, Q, 2 | 4)]."""
    from groundingdino.models.GroundingDINO import transformer
    from groundingdino.util.misc import inverse_sigmoid

    output = tgt
    reference_points = refpoints_unsigmoid.sigmoid()
    intermediate, references = [], [reference_points]
    for layer_id, layer in enumerate(self.layers):
        if reference_points.shape[-1] == 4:  # boxes: scaled by the valid ratios, both corners' axes
            points = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[None, :]
        else:
            points = reference_points[:, :, None] * valid_ratios[None, :]
        sine = transformer.gen_sineembed_for_position(points[:, :, 0, :])  # (Q, B, 2C)
        raw_query_pos = self.ref_point_head(sine)
        pos_scale = self.query_scale(output) if self.query_scale is not None else 1
        output = layer(
            tgt=output,
            tgt_query_pos=pos_scale * raw_query_pos,
            tgt_query_sine_embed=sine,
            tgt_key_padding_mask=tgt_key_padding_mask,
            tgt_reference_points=points,
            memory_text=memory_text,
            text_attention_mask=text_attention_mask,
            memory=memory,
            memory_key_padding_mask=memory_key_padding_mask,
            memory_level_start_index=level_start_index,
            memory_spatial_shapes=spatial_shapes,
            memory_pos=pos,
            self_attn_mask=tgt_mask,
            cross_attn_mask=memory_mask,
        )
        if self.bbox_embed is not None:  # refine the reference boxes
            refined = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = refined.detach()
            references.append(refined)
        intermediate.append(self.norm(output))
    return [[out.transpose(0, 1) for out in intermediate], [ref.transpose(0, 1) for ref in references]]


def with_host_shapes(function: Callable, shapes_at: int, total_of: Callable | None = None) -> Callable:
    """``function`` (which iterates over its level-sizes argument, position ``shapes_at``, as (H_, W_))
    called with those sizes as Python ints. ``total_of(args)``: the number of values the levels must
    hold, when the arguments tell it (checks that the recorded sizes belong to this call)."""

    def patched(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        args[shapes_at] = host_shapes(args[shapes_at], total_of(args) if total_of else None)
        return function(*args, **kwargs)

    patched.__wrapped__ = function  # type: ignore[attr-defined]
    return patched


def install() -> None:
    """Route groundingdino's level-size readers through the host-int versions and its decoder loop
    through one without the NaN check (idempotent)."""
    own = originals()  # remember groundingdino's own first
    _set(
        deformable_attention,
        deformable_attention_forward,
        decoder_forward,
        with_host_shapes(own["proposals"], 2, lambda args: args[0].shape[1]),
        with_host_shapes(own["reference_points"], 0),
    )


@contextlib.contextmanager
def uninstalled() -> Iterator[None]:
    """groundingdino's own readers while inside (parity tests, the benchmark's previous path), then
    the patched ones again."""
    own = originals()
    _set(own["attention"], own["forward"], own["decoder"], own["proposals"], own["reference_points"])
    try:
        yield
    finally:
        install()


def _set(
    attention: Callable, forward: Callable, decoder: Callable, proposals: Callable, reference_points: Callable
) -> None:
    from groundingdino.models.GroundingDINO import ms_deform_attn, transformer

    ms_deform_attn.multi_scale_deformable_attn_pytorch = attention
    ms_deform_attn.MultiScaleDeformableAttention.forward = forward
    transformer.TransformerDecoder.forward = decoder
    transformer.gen_encoder_output_proposals = proposals
    transformer.TransformerEncoder.get_reference_points = staticmethod(reference_points)


_ORIGINALS: dict[str, Any] = {}


def originals() -> dict[str, Any]:
    """groundingdino's own functions, also after :func:`install`: ``attention`` (the fallback),
    ``forward`` (MultiScaleDeformableAttention's), ``decoder`` (TransformerDecoder.forward),
    ``proposals`` (gen_encoder_output_proposals), ``reference_points``
    (TransformerEncoder.get_reference_points)."""
    if not _ORIGINALS:
        from groundingdino.models.GroundingDINO import ms_deform_attn, transformer

        _ORIGINALS.update(
            attention=ms_deform_attn.multi_scale_deformable_attn_pytorch,
            forward=ms_deform_attn.MultiScaleDeformableAttention.forward,
            decoder=transformer.TransformerDecoder.forward,
            proposals=transformer.gen_encoder_output_proposals,
            reference_points=transformer.TransformerEncoder.get_reference_points,
        )
    return _ORIGINALS
