"""Sam2Segmenter on the real SAM2.1 architecture (tiny config, random weights, 128 px inputs)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from images import random_jpeg
from PIL import Image

from pseudolabel import schemas
from pseudolabel.models import tiny
from pseudolabel.models.interfaces import Candidates, PreparedImage
from pseudolabel.models.loading import ModelConfigError, SegmenterSpec, load_segmenter
from pseudolabel.models.mask_upsample import (
    BUCKET_COST,
    BilinearAxis,
    crop_boxes,
    fill_planned,
    plan_crops,
    planned_changes,
    positive_bounds,
)
from pseudolabel.models.prompts import prompt_groups
from pseudolabel.models.runtime import counting_syncs, inference
from pseudolabel.models.sam2_segmenter import (
    Sam2Segmenter,
    _decoder_calls,
    build_sam2_model,
)
from pseudolabel.models.stages import SegmentationSettings, run_segmentation
from pseudolabel.rle import decode_rle, encode_crop_changes, encode_crops, set_bits
from pseudolabel.testing.models import FakeSegmenter, box_prompts

SIZE = 128


@pytest.fixture(scope="module")
def model(device):
    return build_sam2_model("tiny", None, overrides=tiny.tiny_sam2_overrides(SIZE)).to(device)


@pytest.fixture(scope="module")
def segmenter(model, device):
    return Sam2Segmenter(model, device=device, batch_size=4)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _mask(result, j) -> np.ndarray:
    return decode_rle(result.masks.counts[j], result.masks.height, result.masks.width)


def _prompts(items, boxes) -> list[Candidates]:
    """Box-only candidates for each prepared image."""
    return [
        box_prompts(item.image_id, item.width, item.height, b) for item, b in zip(items, boxes, strict=True)
    ]


@pytest.mark.model
@pytest.mark.parametrize(
    ("multimask", "mix_images"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_matches_the_stock_predictor(model, segmenter, multimask, mix_images, monkeypatch):
    """Same masks and scores as SAM2ImagePredictor.set_image + predict (the seeds' per-image loop), with
    decoder calls per image (the CPU default) and mixing the batch's images (the CUDA default)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    monkeypatch.setattr(segmenter, "mix_images", mix_images)

    data = [random_jpeg(200, 150, seed=1), random_jpeg(90, 160, seed=2)]
    boxes = [
        np.array([[10, 10, 120, 100], [50, 20, 190, 140]], np.float32),
        np.array([[5, 30, 80, 150]], np.float32),
    ]
    items = [segmenter.prepare(f"i{k}", d) for k, d in enumerate(data)]
    ours = segmenter.segment(items, _prompts(items, boxes), multimask=multimask)

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [
        (SIZE // 4,) * 2,
        (SIZE // 8,) * 2,
        (SIZE // 16,) * 2,
    ]  # stock assumes 1024 px
    for d, b, result in zip(data, boxes, ours, strict=True):
        predictor.set_image(np.array(Image.open(io.BytesIO(d)).convert("RGB")))
        masks, scores, _ = predictor.predict(box=b, multimask_output=multimask)
        masks, scores = masks.reshape(len(b), -1, *masks.shape[-2:]), scores.reshape(len(b), -1)
        assert result.multimask_scores.shape == scores.shape == (len(b), 3 if multimask else 1)
        np.testing.assert_allclose(
            result.multimask_scores, scores, atol=2e-3
        )  # inputs differ only by uint8 resize rounding
        for j in range(len(b)):
            chosen = int(scores[j].argmax())
            assert result.multimask_index[j] == chosen and result.mask_scores[j] == pytest.approx(
                scores[j, chosen], abs=2e-3
            )
            reference = masks[j, chosen] > 0
            assert _mask(result, j).shape == reference.shape == (result.masks.height, result.masks.width)
            assert _iou(_mask(result, j), reference) > 0.98


@pytest.mark.model
def test_boxes_are_read_in_original_pixels(segmenter):
    """One scene at 1x and at 2x (exact pixel doubling: both become the SAME 128 px model input), in one
    batch. 2x boxes on the 2x image must be the same prompt as 1x boxes on the 1x image."""
    small = Image.open(io.BytesIO(random_jpeg(256, 192, seed=3)))
    large = small.resize((512, 384), Image.Resampling.NEAREST)
    png = []
    for image in (small, large):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png.append(buffer.getvalue())
    items = [segmenter.prepare("small", png[0]), segmenter.prepare("large", png[1])]
    assert torch.equal(items[0].pixels, items[1].pixels)
    box = np.array([[40, 20, 140, 100]], np.float32)
    batch = [*items, items[1]]
    one, two, unscaled = segmenter.segment(batch, _prompts(batch, [box, box * 2, box]))
    assert (one.masks.height, one.masks.width, two.masks.height, two.masks.width) == (192, 256, 384, 512)
    np.testing.assert_allclose(
        two.multimask_scores, one.multimask_scores, atol=1e-6
    )  # identical prompt -> identical outputs
    assert not np.allclose(unscaled.multimask_scores, one.multimask_scores, atol=1e-6)
    doubled = _mask(one, 0).repeat(2, axis=0).repeat(2, axis=1)
    assert _iou(doubled, _mask(two, 0)) > 0.9 > _iou(doubled, _mask(unscaled, 0))


@pytest.mark.model
def test_empty_boxes_and_chunking_do_not_change_results(model, segmenter, device):
    items = [segmenter.prepare(f"i{k}", random_jpeg(160, 120, seed=k)) for k in range(2)]
    boxes = [np.array([[0, 0, 80, 60], [40, 30, 160, 120], [10, 50, 150, 110]], np.float32), np.zeros((0, 4))]
    reference = segmenter.segment(items, _prompts(items, boxes), multimask=True)
    assert len(reference[1].masks) == 0 and reference[1].multimask_scores.shape == (0, 3)
    assert (reference[1].masks.height, reference[1].masks.width) == (120, 160)

    chunked = Sam2Segmenter(model, device=device, max_boxes_per_call=2, chunk_pixels=160 * 120)
    again = chunked.segment(items, _prompts(items, boxes), multimask=True)
    np.testing.assert_allclose(again[0].multimask_scores, reference[0].multimask_scores, atol=1e-5)
    for j in range(3):
        assert _iou(_mask(again[0], j), _mask(reference[0], j)) > 0.999
    assert len(again[1].masks) == 0


def test_run_segmentation_refuses_a_different_image_frame():
    data = random_jpeg(40, 30)
    boxes = [box_prompts("a", 80, 60, np.array([[0, 0, 10, 10]], np.float32))]
    with pytest.raises(RuntimeError, match="re-run detections"):
        run_segmentation(boxes, lambda _: data, FakeSegmenter(), SegmentationSettings(), workers=1)


def test_candidates_from_tables_join_in_candidate_order():
    detections = pa.table(
        {
            "image_id": ["b", "a", "a"],
            "candidate_id": [0, 1, 0],
            "x0": [1.0, 2, 3],
            "y0": [0.0, 0, 0],
            "x1": [5.0, 6, 7],
            "y1": [5.0, 5, 5],
            "box_score": [0.9, 0.2, 0.8],
            "text_score": [0.9, 0.2, 0.8],
            "phrase": ["p"] * 3,
            "query_index": [5, 9, 2],
            "box_prompt": [True] * 3,
            "points": [[], [], []],
            "point_labels": [[], [], []],
        },
        schema=schemas.DETECTIONS,
    )
    images = pa.table(
        {"image_id": ["c", "b", "a"], "width": [9, 9, 9], "height": [9, 9, 9], "num_candidates": [0, 1, 2]},
        schema=schemas.DETECTION_IMAGES,
    )
    joined = Candidates.from_tables(detections, images)
    assert [ref.image_id for ref in joined] == ["a", "b", "c"]
    assert joined[0].boxes[:, 0].tolist() == [3.0, 2.0] and joined[2].boxes.shape == (0, 4)
    assert joined[0].query_indices.tolist() == [2, 9] and joined[0].box_scores.tolist() == pytest.approx(
        [0.8, 0.2]
    )
    assert joined[1].phrases == ["p"] and len(joined[2]) == 0 and joined[2].query_indices.dtype == np.int32
    legacy = Candidates.from_tables(detections.drop_columns(["query_index"]), images)
    assert legacy[0].query_indices.tolist() == [0, 1]  # shards before query_index: candidate order
    nothing = Candidates.from_tables(detections.slice(0, 0), images)
    assert [len(found) for found in nothing] == [0, 0, 0] and nothing[0].boxes.shape == (0, 4)


@pytest.mark.model
def test_spec_identity_and_tiny_guard(tmp_path):
    spec = SegmenterSpec(checkpoint="random", tiny=True, variant="tiny", cache_dir=str(tmp_path))
    identity = load_segmenter(spec).describe()
    assert identity["smoke_run"] is True and identity["input_size"] == f"{SIZE}x{SIZE}"
    assert identity["variant"] == "tiny-tiny" and identity["weights"] == "random"
    with pytest.raises(ModelConfigError, match="random"):
        load_segmenter(SegmenterSpec(tiny=True, cache_dir=str(tmp_path)))


def _smooth_logits(count: int, size: int, seed: int) -> torch.Tensor:
    """(count, size, size) logits mostly < 0 with positive blobs; plus all-negative, all-positive and
    single-positive-pixel masks at the edges."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 1, size // 4, size // 4, generator=generator)
    logits = F.interpolate(noise, (size, size), mode="bilinear")[:, 0] * 4 - 3
    logits[0] = -1.0
    logits[1] = 2.0
    logits[2] = -5.0
    logits[2, -1, 0] = 0.5
    return logits


def _crops_then_encode(segmenter, low_res, items, counts):
    bounds = positive_bounds(low_res).cpu().numpy()
    crops = crop_boxes(segmenter.image_size // 4, items, counts, bounds)
    placed = segmenter._upsample(low_res, items, counts, crops)
    encoded = []
    for item, (copy, boxes, offsets) in zip(items, placed, strict=True):
        (changes,) = copy.wait()
        encoded.append(encode_crop_changes(changes, boxes, item.height, item.width, offsets))
    return encoded, crops


def _assert_same_as_full_upsampling(encoded, crops, low_res, height, width):
    """Nothing positive outside the crops (the exact part), and the masks equal full upsampling up to
    pixels whose logit is within float rounding of 0."""
    full = F.interpolate(low_res[:, None], (height, width), mode="bilinear", align_corners=False)[:, 0].cpu()
    for j, (x0, y0, w, h) in enumerate(crops):
        outside = full[j].clone()
        outside[y0 : y0 + h, x0 : x0 + w] = -1
        assert not (outside > 0).any()
        ours = torch.from_numpy(decode_rle(encoded.counts[j], height, width))
        differ = ours != (full[j] > 0)
        assert differ.sum() <= 2 and (full[j][differ].abs() < 1e-5).all()


@pytest.mark.parametrize("chunk_pixels", [1 << 30, 500])
def test_upsampling_only_where_positive_equals_full_upsampling(model, device, chunk_pixels):
    """Masks from the crops (bounds of the positive low-res logits, bilinear inside them) equal
    F.interpolate over the whole image then > 0, for up-, down- and unscaled sizes in one batch
    (chunk_pixels=500: several copy rounds)."""
    segmenter = Sam2Segmenter(model, device=device, chunk_pixels=chunk_pixels)
    low = SIZE // 4
    sizes = [(53, 37), (low, low), (15, 20), (450, 300), (13, 700)]
    items = [PreparedImage(f"i{k}", w, h, None) for k, (w, h) in enumerate(sizes)]
    logits = _smooth_logits(6 * len(sizes), low, seed=5).to(device)
    encoded, crops = _crops_then_encode(segmenter, logits, items, [6] * len(sizes))
    for k, (item, result) in enumerate(zip(items, encoded, strict=True)):
        rows = slice(6 * k, 6 * k + 6)
        _assert_same_as_full_upsampling(result, crops[rows], logits[rows], item.height, item.width)


def _full_masks(buffer, boxes, offsets, height, width) -> np.ndarray:
    """(N, H, W) masks from a crop buffer, checking the zero separators of every slot."""
    masks = np.zeros((len(boxes), height, width), bool)
    for m, ((x0, y0, w, h), offset) in enumerate(zip(boxes, offsets, strict=True)):
        stride = h + 1 if h < height else h
        body = buffer[offset + 1 : offset + 1 + w * stride].reshape(w, stride)
        assert not buffer[offset] and not buffer[offset + 1 + w * stride] and not body[:, h:].any()
        masks[m, y0 : y0 + h, x0 : x0 + w] = body[:, :h].T
    return masks


def _per_mask_reference(logits: torch.Tensor, item: PreparedImage, crops: np.ndarray) -> np.ndarray:
    """(n, H, W) masks upsampled one at a time inside their crops, with :class:`BilinearAxis`'s indices
    and weights and the same float operations as ``fill_planned`` (along x, then along y)."""
    low = logits.shape[-1]
    xs, ys = BilinearAxis.of(low, item.width), BilinearAxis.of(low, item.height)
    masks = np.zeros((len(crops), item.height, item.width), bool)
    for m, (x0, y0, w, h) in enumerate(crops.tolist()):
        if not w:
            continue
        cols, rows = slice(x0, x0 + w), slice(y0, y0 + h)
        source = logits[m].t()  # (s columns, s rows)
        along_x = source[xs.lo[cols]] * torch.from_numpy(xs.w_lo[cols, None]) + source[
            xs.hi[cols]
        ] * torch.from_numpy(xs.w_hi[cols, None])  # (w, s)
        lower = along_x[:, ys.lo[rows]] * torch.from_numpy(ys.w_lo[rows])
        upper = along_x[:, ys.hi[rows]] * torch.from_numpy(-ys.w_hi[rows])
        masks[m, rows, cols] = (lower > upper).numpy().T
    return masks


@pytest.mark.parametrize(
    "steps_per_octave, bucket_cost, max_pixels",
    [(0, 1 << 15, 1 << 26), (1, 1 << 15, 1 << 26), (2, 1 << 15, 1 << 26), (8, 1 << 15, 1 << 26)]
    + [(None, 1 << 15, 1 << 26), (None, 1 << 23, 1 << 26), (0, 1 << 23, 5000)],
)
def test_buckets_of_mixed_crop_sizes_equal_the_per_mask_upsampling(
    device, steps_per_octave, bucket_cost, max_pixels
):
    """Masks upsampled bucket by bucket (crops grown to their bucket's size, images of two sizes mixed in
    one plan, buckets split to ``max_pixels``) equal the per-mask path bit for bit, slots never overlap,
    and grown crops stay inside the image; a NaN logit's row and column count as positive."""
    low = 32
    sizes = [(53, 37), (450, 300), (53, 37), (13, 70)]
    generator = torch.Generator().manual_seed(3)
    blobs = torch.randn(4 * len(sizes), 1, 4, 4, generator=generator)
    logits = F.interpolate(blobs, (low, low), mode="bilinear")[:, 0] * 3 - 2.5
    logits[0], logits[5] = -1.0, 1.0  # nothing, everything
    logits[6, 3:5, 20:30] = 2.0  # a thin bar: a crop far from square
    logits[7, 10, 10] = float("nan")
    items = [PreparedImage(f"i{k}", w, h, None) for k, (w, h) in enumerate(sizes)]
    counts = [4] * len(sizes)
    bounds = positive_bounds(logits.to(device)).cpu().numpy()
    assert bounds[7, 0] <= 10 <= bounds[7, 1] and bounds[7, 2] <= 10 <= bounds[7, 3]
    crops = crop_boxes(low, items, counts, bounds)
    heights = np.repeat([h for _, h in sizes], counts)
    widths = np.repeat([w for w, _ in sizes], counts)
    plan = plan_crops(low, crops, heights, widths, steps_per_octave, bucket_cost, max_pixels)
    buffer = fill_planned(plan, logits.to(device)).cpu().numpy()
    assert len(buffer) == plan.total and len(plan.buckets) < len(crops) - 1
    assert all(b.count == 1 or b.count * b.width * b.height <= max_pixels for b in plan.buckets)
    x0, y0, w, h = plan.boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= widths).all() and (y0 + h <= heights).all()
    assert ((w >= crops[:, 2]) & (h >= crops[:, 3])).all()
    ends = plan.offsets + w * np.where(h < heights, h + 1, h) + 2
    order = np.argsort(plan.offsets)
    assert (plan.offsets[order][1:] >= ends[order][:-1]).all() and ends.max() == plan.total
    for k, item in enumerate(items):
        rows = slice(4 * k, 4 * k + 4)
        expected = _per_mask_reference(logits[rows], item, crops[rows])
        ours = _full_masks(buffer, plan.boxes[rows], plan.offsets[rows], item.height, item.width)
        np.testing.assert_array_equal(ours, expected)
        encoded = encode_crops(buffer, plan.boxes[rows], item.height, item.width, plan.offsets[rows])
        assert [decode_rle(c, item.height, item.width).sum() for c in encoded.counts] == list(
            expected.sum(axis=(1, 2))
        )
    assert _full_masks(buffer, plan.boxes[5:6], plan.offsets[5:6], 300, 450).all()
    assert not _full_masks(buffer, plan.boxes[:1], plan.offsets[:1], 37, 53).any()


@pytest.mark.parametrize("masks", [3, 17])
def test_change_positions_packed_on_the_device_equal_the_buffer_s(device, masks):
    """planned_changes (bits packed on the device, unpacked on the host) = where the filled buffer
    changes value, whatever the buffer's length (padded to whole 64-bit words)."""
    low = 32
    logits = _smooth_logits(masks, low, seed=masks).to(device)
    items = [PreparedImage("i", 97, 61, None)]
    crops = crop_boxes(low, items, [masks], positive_bounds(logits).cpu().numpy())
    plan = plan_crops(low, crops, np.full(masks, 61), np.full(masks, 97))
    buffer = fill_planned(plan, logits).cpu().numpy()
    (changes,) = planned_changes(plan, logits).wait()
    np.testing.assert_array_equal(changes, np.flatnonzero(buffer[1:] != buffer[:-1]))
    assert len(changes) and (plan.total - 1) % 64  # some changes, and a length that needed padding
    packed = np.packbits(np.random.default_rng(masks).random(64 * masks) < 0.01, bitorder="little")
    np.testing.assert_array_equal(set_bits(packed), np.flatnonzero(np.unpackbits(packed, bitorder="little")))


def test_a_costlier_pass_means_fewer_larger_buckets():
    """The plan trades device calls for pixels: with a GPU's bucket cost the 300 masks of one image go
    in a few passes, with a CPU's in more, smaller ones that compute fewer pixels."""
    rng = np.random.default_rng(0)
    height, width, low = 480, 640, 256
    size = (rng.uniform(0.05, 0.5, (300, 2)) * [width, height]).astype(np.int64)
    corner = (rng.uniform(0, 1, (300, 2)) * ([width, height] - size)).astype(np.int64)
    crops = np.concatenate([corner, size], axis=1)
    heights, widths = np.full(300, height), np.full(300, width)
    on = {
        device: plan_crops(low, crops, heights, widths, bucket_cost=cost)
        for device, cost in BUCKET_COST.items()
    }
    pixels = {device: int((plan.boxes[:, 2] * plan.boxes[:, 3]).sum()) for device, plan in on.items()}
    assert len(on["cuda"].buckets) <= 3 < 10 <= len(on["cpu"].buckets)
    assert pixels["cpu"] < pixels["cuda"]
    assert (crops[:, 2] * crops[:, 3]).sum() <= pixels["cpu"]


def test_decoder_calls_pack_images_and_split_large_ones():
    assert _decoder_calls([3, 0, 5, 130, 2, 64], 64) == [
        slice(0, 8),
        slice(8, 72),
        slice(72, 136),
        slice(136, 140),
        slice(140, 204),
    ]
    assert _decoder_calls([0, 0], 4) == []
    # One image per call: split at every image boundary and every `limit` boxes.
    assert _decoder_calls([3, 0, 5, 130, 2], 64, mix_images=False) == [
        slice(0, 3),
        slice(3, 8),
        slice(8, 72),
        slice(72, 136),
        slice(136, 138),
        slice(138, 140),
    ]


@pytest.mark.model
def test_300_candidates_on_a_small_and_a_large_image(model, segmenter):
    """300 boxes: on a small image the same masks and scores as the stock predictor; on a 1 MP image the
    same masks as full upsampling of the decoder's logits; one batch, two host synchronisations."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    rng = np.random.default_rng(3)
    data = [random_jpeg(200, 150, seed=7), random_jpeg(1200, 900, seed=8)]
    items = [segmenter.prepare(f"i{k}", d) for k, d in enumerate(data)]
    boxes = []
    for item in items:
        size = rng.uniform(0.05, 0.6, (300, 2)) * [item.width, item.height]
        corner = rng.uniform(0, 1, (300, 2)) * ([item.width, item.height] - size)
        boxes.append(np.concatenate([corner, corner + size], 1).astype(np.float32))
    prompts = _prompts(items, boxes)
    with counting_syncs(emulate_device=segmenter.device.type == "cpu") as syncs:
        small, large = segmenter.segment(items, prompts)
    assert syncs.count == 2, syncs.by_kind
    assert len(small.masks) == len(large.masks) == 300

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]
    predictor.set_image(np.array(Image.open(io.BytesIO(data[0])).convert("RGB")))
    masks, scores, _ = predictor.predict(box=boxes[0], multimask_output=False)
    np.testing.assert_allclose(small.mask_scores, scores[:, 0], atol=2e-3)
    ious = [_iou(_mask(small, j), masks[j, 0] > 0) for j in range(300)]
    assert np.mean(ious) > 0.99 and min(ious) > 0.9

    with inference(segmenter.device, segmenter.precision):
        embeddings, high_res = segmenter._encode(items)
        low_res, _, _ = segmenter._decode(items, prompts, embeddings, high_res, False)
    for start in range(0, 300, 60):
        rows = slice(start, start + 60)
        part = replace(large.masks, counts=large.masks.counts[rows])
        crops = crop_boxes(
            segmenter.image_size // 4, items[1:], [60], positive_bounds(low_res[300:][rows]).cpu().numpy()
        )
        _assert_same_as_full_upsampling(part, crops, low_res[300:][rows], 900, 1200)


# ---- clicks: box + clicks, clicks only, one click ---------------------------------------------------


def _stock_predictor(model):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [
        (SIZE // 4,) * 2,
        (SIZE // 8,) * 2,
        (SIZE // 16,) * 2,
    ]  # stock assumes 1024 px
    return predictor


def _assert_matches_stock(model, segmenter, items, candidates, results, multimask):
    """Each candidate's scores and mask equal SAM2ImagePredictor.predict with that candidate's box (or
    None) and real clicks (or None), one prompt per call, on the same image features (ours, so the
    comparison is the prompt path alone, exact up to float rounding: one padding token more or less
    moves the scores by ~1e-3; the image preprocessing is test_matches_the_stock_predictor's)."""
    predictor = _stock_predictor(model)
    for item, found, result in zip(items, candidates, results, strict=True):
        with torch.inference_mode():
            embeddings, high_res = segmenter._encode([item])
        predictor._features = {"image_embed": embeddings, "high_res_feats": high_res}
        predictor._orig_hw, predictor._is_image_set = [(item.height, item.width)], True
        boxed = found.box_prompts()
        assert result.multimask_scores.shape == (len(found), 3 if multimask else 1)
        for j in range(len(found)):
            keep = found.point_labels[j] >= 0 if found.points is not None else np.zeros(0, bool)
            masks, scores, _ = predictor.predict(
                point_coords=found.points[j][keep] if keep.any() else None,
                point_labels=found.point_labels[j][keep].astype(np.int32) if keep.any() else None,
                box=found.boxes[j] if boxed[j] else None,
                multimask_output=multimask,
            )
            np.testing.assert_allclose(result.multimask_scores[j], scores, atol=1e-4)
            chosen = int(scores.argmax())
            assert result.multimask_index[j] == chosen
            assert result.mask_scores[j] == pytest.approx(scores[chosen], abs=1e-4)
            assert _iou(_mask(result, j), masks[chosen] > 0) > 0.999, (found.image_id, j)


def _with_clicks(item, boxes, points, labels, box_prompt) -> Candidates:
    found = box_prompts(item.image_id, item.width, item.height, np.asarray(boxes, np.float32))
    return found.with_prompts(np.asarray(points, np.float32), np.asarray(labels, np.int8), box_prompt)


@pytest.mark.model
@pytest.mark.parametrize(
    ("kind", "boxes", "points", "labels", "box_prompt"),
    [
        # box + a negative click inside it (the refinement case)
        ("box+negative", [[20, 15, 170, 130]], [[[90, 70]]], [[0]], [True]),
        # clicks only: two objects clicks and one background click
        ("clicks", [[40, 30, 160, 120]], [[[60, 50], [150, 110], [100, 20]]], [[1, 1, 0]], [False]),
        # one click (its "box" is only the click's extent)
        ("one click", [[80, 60, 80, 60]], [[[80, 60]]], [[1]], [False]),
    ],
)
def test_click_prompts_match_the_stock_predictor(model, segmenter, kind, boxes, points, labels, box_prompt):
    data = random_jpeg(200, 150, seed=11)
    item = segmenter.prepare("c", data)
    found = _with_clicks(item, boxes, points, labels, box_prompt)
    results = segmenter.segment([item], [found], multimask=True)
    _assert_matches_stock(model, segmenter, [item], [found], results, multimask=True)


@pytest.mark.model
@pytest.mark.parametrize(("multimask", "mix_images"), [(True, False), (False, True)])
def test_mixed_prompt_kinds_in_one_batch_match_the_stock_predictor(
    model, segmenter, multimask, mix_images, monkeypatch
):
    """Boxes, box + clicks, clicks only and single clicks, interleaved over three images of different
    sizes in one batch (padding clicks in the middle of a row included): every candidate as the stock
    predictor segments it alone, in the candidates' own order."""
    monkeypatch.setattr(segmenter, "mix_images", mix_images)
    data = [random_jpeg(200, 150, seed=1), random_jpeg(90, 160, seed=2), random_jpeg(130, 130, seed=3)]
    items = [segmenter.prepare(f"m{k}", d) for k, d in enumerate(data)]
    pad = [0, 0]
    candidates = [
        _with_clicks(
            items[0],
            [[10, 10, 120, 100], [50, 20, 190, 140], [30, 30, 90, 90], [100, 75, 100, 75]],
            [[pad, pad], [[120, 80], pad], [[40, 40], [80, 85]], [[100, 75], pad]],
            [[-1, -1], [0, -1], [1, 0], [1, -1]],
            [True, True, False, False],
        ),
        _with_clicks(
            items[1], [[45, 80, 45, 80], [5, 30, 80, 150]], [[[45, 80]], [pad]], [[1], [-1]], [False, True]
        ),
        # two prompts of one layout on one image: one decoder call, the image's features broadcast
        _with_clicks(
            items[2],
            [[10, 10, 120, 120], [5, 20, 70, 110]],
            [[[60, 60], pad, [100, 20]], [[20, 30], [50, 50], pad]],
            [[1, -1, 0], [1, 0, -1]],
            [True, True],
        ),
    ]
    results = segmenter.segment(items, candidates, multimask=multimask)
    _assert_matches_stock(model, segmenter, items, candidates, results, multimask=multimask)


@pytest.mark.model
def test_a_negative_click_refines_the_box_mask(segmenter):
    """Box + a background click is a different prompt than the box alone: the mask changes (random
    weights say nothing about whether it improves)."""
    item = segmenter.prepare("r", random_jpeg(200, 150, seed=4))
    box = np.array([[20, 15, 170, 130]], np.float32)
    alone = box_prompts("r", 200, 150, box)
    refined = alone.with_prompts(np.array([[[90, 70]]], np.float32), np.array([[0]], np.int8))
    first, second = segmenter.segment([item, item], [alone, refined], multimask=True)
    assert not np.allclose(first.multimask_scores, second.multimask_scores, atol=1e-3)
    before, after = _mask(first, 0), _mask(second, 0)
    assert (before != after).sum() > 0.01 * before.size
    # the same box + click again gives the same mask: the change is the click, not noise
    (again,) = segmenter.segment([item], [refined], multimask=True)
    assert np.array_equal(_mask(again, 0), after)


def test_prompt_groups_by_layout_without_padding():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 9, 9], [2, 2, 8, 8], [5, 5, 5, 5]], np.float32)
    found = box_prompts("g", 20, 20, boxes).with_prompts(
        np.array([[[0, 0], [0, 0]], [[3, 4], [0, 0]], [[0, 0], [6, 7]], [[5, 5], [0, 0]]], np.float32),
        np.array([[-1, -1], [0, -1], [-1, 1], [1, -1]], np.int8),
        np.array([True, True, True, False]),
    )
    plain = box_prompts("h", 20, 20, boxes[:1])
    groups = prompt_groups([found, plain])
    layouts = [(g.boxed, g.clicks, g.rows.tolist()) for g in groups]
    assert layouts == [(True, 0, [0, 4]), (True, 1, [1, 2]), (False, 1, [3])]
    assert groups[0].labels.tolist() == [[2, 3], [2, 3]] and groups[0].points.shape == (2, 2, 2)
    assert groups[1].labels.tolist() == [[2, 3, 0], [2, 3, 1]]
    assert groups[1].points[:, 2].tolist() == [[3, 4], [6, 7]]  # the padding dropped, wherever it was
    assert groups[1].points[0, :2].tolist() == [[1, 1], [9, 9]]
    assert groups[2].labels.tolist() == [[1]] and groups[2].points.tolist() == [[[5, 5]]]
    # a candidate with neither a box prompt nor a click cannot be segmented
    broken = replace(
        found, box_prompt=np.array([True, True, True, False]), point_labels=np.full((4, 2), -1, np.int8)
    )
    with pytest.raises(ValueError, match="neither a box prompt nor a click"):
        prompt_groups([broken])


def test_fake_segmenter_takes_clicks_without_a_box_prompt():
    """The stand-in follows the prompt kinds too: a lone click (degenerate extent box, not a prompt) gets
    a disc around it, a background click cuts one out of the box's ellipse."""
    item = PreparedImage("f", 100, 80, None)
    found = box_prompts("f", 100, 80, np.array([[30, 20, 30, 20], [10, 10, 90, 70]], np.float32))
    found = found.with_prompts(
        np.array([[[30, 20]], [[50, 40]]], np.float32), np.array([[1], [0]], np.int8), np.array([False, True])
    )
    (result,) = FakeSegmenter().segment([item], [found], multimask=True)
    click, refined = _mask(result, 0), _mask(result, 1)
    assert click[20, 30] and 0 < click.sum() < 200  # a disc of radius 4 around (30, 20)
    assert not refined[40, 50] and refined[40, 20] and refined.sum() > 2000  # ellipse minus a disc
    (plain,) = FakeSegmenter().segment([item], [box_prompts("f", 100, 80, found.boxes[1:])])
    assert _mask(plain, 0)[40, 50] and (_mask(plain, 0) & ~refined).sum() == pytest.approx(49, abs=10)
