"""groundingdino's multi-scale deformable attention without host synchronisation.

groundingdino-py installs no compiled op here, so its pure-PyTorch fallback runs, and it reads the
feature levels' sizes back from a device tensor on every call. :func:`install_host_shape_deformable_attention`
routes that fallback through :func:`deformable_attention`, which takes the sizes as Python ints recorded
by :func:`spatial_shapes` while a batch runs (and reads a tensor once when called without them).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# The (h, w) of each feature level of the batch being run, as Python ints (set by ``_spatial_shapes``).
_SHAPES: contextvars.ContextVar[tuple[tuple[int, int], ...] | None] = contextvars.ContextVar(
    "grounding_dino_spatial_shapes", default=None
)


@contextlib.contextmanager
def spatial_shapes(sources: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make the sizes of the feature levels ``sources`` [(B, C, h, w)...] (host metadata, no sync)
    known to :func:`deformable_attention` while the transformer runs on them."""
    token = _SHAPES.set(tuple((int(s.shape[-2]), int(s.shape[-1])) for s in sources))
    try:
        yield
    finally:
        _SHAPES.reset(token)


def deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """groundingdino's ``multi_scale_deformable_attn_pytorch`` with the level sizes as Python ints.

    The original iterates over ``spatial_shapes``, a (L, 2) device tensor: every ``H_ * W_`` is a
    device->host read, 2L + L of them per call, 12 calls per image batch. Here the sizes come as ints
    (or, when given a tensor, are read once). Shapes: value (B, sum h*w, heads, d); sampling_locations
    (B, Q, heads, L, P, 2) in [0, 1]; attention_weights (B, Q, heads, L, P) -> (B, Q, heads * d).
    Same operations in the same order, so the same result (``tests/worker/test_grounding_dino.py``).
    """
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = [tuple(shape) for shape in spatial_shapes.tolist()]
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(spatial_shapes):
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


def _patched_deformable_attention(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Stands in for groundingdino's fallback: the sizes recorded for this batch when they fit ``value``."""
    shapes = _SHAPES.get()
    if (
        shapes is None
        or sum(h * w for h, w in shapes) != value.shape[1]
        or len(shapes) != len(value_spatial_shapes)
    ):
        shapes = None
    return deformable_attention(
        value, value_spatial_shapes if shapes is None else shapes, sampling_locations, attention_weights
    )


def install_host_shape_deformable_attention() -> None:
    """Route groundingdino's pure-PyTorch deformable attention through :func:`deformable_attention`."""
    original_deformable_attention()  # remember groundingdino's own first
    from groundingdino.models.GroundingDINO import ms_deform_attn

    ms_deform_attn.multi_scale_deformable_attn_pytorch = _patched_deformable_attention


_ORIGINAL: list[Any] = []


def original_deformable_attention() -> Any:
    """groundingdino's own fallback, also after :func:`install_host_shape_deformable_attention` (parity tests)."""
    if not _ORIGINAL:
        from groundingdino.models.GroundingDINO import ms_deform_attn

        _ORIGINAL.append(ms_deform_attn.multi_scale_deformable_attn_pytorch)
    return _ORIGINAL[0]
