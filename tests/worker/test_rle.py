"""Device-side RLE encoding must equal pycocotools' own encoder, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pseudolabel.rle import EncodedMasks, decode_rle, encode_device_masks, encode_host_masks


def _reference(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


@pytest.mark.parametrize("shape", [(6, 37, 53), (3, 1, 9), (2, 64, 1)])
def test_device_encoding_matches_pycocotools(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(shape, generator=generator) > 0.6
    masks[0] = False  # empty
    masks[1] = True  # full
    if shape[0] > 2:
        masks[2, :, :] = False
        masks[2, 0, 0] = True  # first pixel on: counts start with a 0-length run
    encoded = encode_device_masks(masks)
    reference = _reference(masks.numpy())
    assert encoded.counts == [r["counts"].decode() for r in reference]
    assert encoded.areas.tolist() == mask_utils.area(reference).tolist()
    np.testing.assert_array_equal(encoded.bboxes, mask_utils.toBbox(reference).astype(np.float32))
    assert (encoded.height, encoded.width) == shape[1:]


def test_blob_mask_round_trip_and_host_encoder_agree():
    ys, xs = np.mgrid[0:120, 0:90]
    blob = ((xs - 40) ** 2 + (ys - 70) ** 2 < 30**2)[None]
    device = encode_device_masks(torch.from_numpy(blob))
    host = encode_host_masks(blob)
    assert device.counts == host.counts
    np.testing.assert_array_equal(decode_rle(device.counts[0], 120, 90), blob[0])
    assert device.areas[0] == blob.sum()
    x, y, w, h = device.bboxes[0]
    assert (x, y, x + w, y + h) == (11, 41, 70, 100)  # COCO xywh of the disc's pixel extent


def test_empty_inputs_and_concat():
    empty = encode_device_masks(torch.zeros(0, 5, 7, dtype=torch.bool))
    assert len(empty) == 0 and (empty.height, empty.width) == (5, 7) and empty.bboxes.shape == (0, 4)
    a = encode_device_masks(torch.ones(2, 5, 7, dtype=torch.bool))
    b = encode_device_masks(torch.zeros(1, 5, 7, dtype=torch.bool))
    joined = EncodedMasks.concat([a, b], 5, 7)
    assert len(joined) == 3 and joined.areas.tolist() == [35, 35, 0]
    with pytest.raises(ValueError):
        encode_device_masks(torch.zeros(5, 7, dtype=torch.bool))


@pytest.mark.parametrize("height, width", [(37, 53), (1, 9), (64, 1), (20, 20)])
def test_crop_encoding_matches_pycocotools(height, width):
    """Masks that are 0 outside a rectangle, encoded from the rectangle alone (every edge case of the
    slot layout: full height, touching each border, one pixel, empty) equal pycocotools' encoding."""
    from pseudolabel.rle import crop_slots, encode_crops

    rng = np.random.default_rng(height * width)
    boxes = [(0, 0, width, height), (0, 0, 0, 0), (width - 1, height - 1, 1, 1), (0, 0, 1, height)]
    for _ in range(8):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        boxes.append((x0, y0, rng.integers(1, width - x0 + 1), rng.integers(1, height - y0 + 1)))
    boxes = np.array(boxes, np.int64)
    full = np.zeros((len(boxes), height, width), bool)
    offsets, strides, total = crop_slots(boxes[:, 2], boxes[:, 3], height)
    buffer = np.zeros(total, bool)
    for m, (x0, y0, w, h) in enumerate(boxes):
        crop = rng.random((h, w)) > 0.4
        if m == 0:
            crop[:] = True
        full[m, y0 : y0 + h, x0 : x0 + w] = crop
        buffer[offsets[m] + 1 : offsets[m] + 1 + w * strides[m]].reshape(w, strides[m])[:, :h] = crop.T
    encoded = encode_crops(buffer, boxes, height, width)
    reference = encode_host_masks(full)
    assert encoded.counts == reference.counts
    np.testing.assert_array_equal(encoded.areas, reference.areas)
    np.testing.assert_array_equal(encoded.bboxes, reference.bboxes)
    # The same slots in reverse order, found through explicit offsets.
    sizes = np.r_[offsets[1:], total] - offsets
    moved = np.cumsum(sizes[::-1])[::-1] - sizes
    shuffled = np.zeros(total, bool)
    for m in range(len(boxes)):
        shuffled[moved[m] : moved[m] + sizes[m]] = buffer[offsets[m] : offsets[m] + sizes[m]]
    assert encode_crops(shuffled, boxes, height, width, moved).counts == reference.counts
