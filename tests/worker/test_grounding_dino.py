"""GroundingDinoDetector on the real architecture (tiny config, random weights, local tiny BERT)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from images import random_jpeg
from PIL import Image

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointNotFound
from pseudolabel.models.grounding_dino import GroundingDinoDetector, input_size
from pseudolabel.models.grounding_dino_build import TextEncoderNotFound, build_grounding_dino
from pseudolabel.models.interfaces import captions_for, normalize_caption, split_caption
from pseudolabel.models.loading import DetectorSpec, ModelConfigError, load_detector

CAPTION = "potted plant . flower ."
SHORT, LONG = 128, 224


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny.write_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def detector(bert_dir, device):
    model = build_grounding_dino("swint_ogc", None, str(bert_dir), overrides=tiny.TINY_GROUNDING_DINO)
    return GroundingDinoDetector(model, device=device, batch_size=2, image_size=SHORT, max_size=LONG)


@pytest.fixture(scope="module")
def prepared(detector):
    """A landscape and a portrait image: the batch pads the landscape one vertically, the portrait one sideways."""
    return [
        detector.prepare(f"img{i}", random_jpeg(w, h, seed=i))
        for i, (w, h) in enumerate([(200, 150), (90, 160)])
    ]


def test_captions():
    assert normalize_caption("  Potted   Plant ") == "potted plant ."
    assert split_caption("plant . Flower .") == ["plant .", "flower ."]
    assert captions_for("plant . flower .", False) == ["plant . flower ."]
    with pytest.raises(ValueError):
        normalize_caption(" . ")


@pytest.mark.parametrize("size", [(200, 150), (90, 160), (1000, 300), (64, 64), (129, 500)])
def test_input_size_follows_groundingdino_resize(size):
    import groundingdino.datasets.transforms as T

    resized, _ = T.RandomResize([SHORT], max_size=LONG)(Image.new("RGB", size), None)
    assert input_size(*size, SHORT, LONG) == resized.size


@pytest.mark.model
def test_prepare_decodes_at_reduced_size_but_reports_original(detector):
    item = detector.prepare("big", random_jpeg(1000, 600))
    assert (item.width, item.height) == (1000, 600)
    assert (
        tuple(item.pixels.shape) == (3, *input_size(1000, 600, SHORT, LONG)[::-1])
        and item.pixels.dtype == torch.uint8
    )


@pytest.mark.model
def test_batched_split_forward_matches_groundingdino_forward(detector, prepared):
    samples = detector._batch_tensor(prepared)
    assert samples.mask[0].any() and samples.mask[1].any()  # both images padded in the shared batch
    logits, boxes = detector.forward_batch(samples, CAPTION)
    with torch.no_grad():
        reference = detector.model(samples, captions=[normalize_caption(CAPTION)] * len(prepared))
    tokens = logits.shape[-1]
    torch.testing.assert_close(logits, reference["pred_logits"][..., :tokens], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, reference["pred_boxes"], atol=1e-5, rtol=1e-5)


@pytest.mark.model
def test_detect_matches_the_seed_predict_in_original_pixels(detector, prepared):
    """The seeds' path: groundingdino.util.inference.predict on one image, boxes scaled by the source size."""
    from groundingdino.util.inference import predict

    item = prepared[1]
    (found,) = detector.detect([item], [CAPTION], box_floor=0.05, text_floor=0.0, max_candidates=1000)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    image = (item.pixels.float() / 255 - mean) / std
    boxes, scores, _ = predict(
        detector.model, image, CAPTION, box_threshold=0.05, text_threshold=0.05, device=str(detector.device)
    )
    order = torch.argsort(-scores, stable=True)
    cx, cy, w, h = (boxes * torch.tensor([item.width, item.height, item.width, item.height])).T
    in_query_order = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).numpy()
    in_query_order = np.clip(in_query_order, 0, [item.width, item.height, item.width, item.height])
    assert len(found) == len(scores) > 0
    np.testing.assert_allclose(found.box_scores, scores[order].numpy(), atol=1e-5)
    np.testing.assert_allclose(found.boxes, in_query_order[order.numpy()], atol=1e-2)
    assert (found.width, found.height) == (90, 160)
    # predict emits the queries above the threshold in query order: query_indices recover that order.
    assert found.query_indices.dtype == np.int32 and len(set(found.query_indices)) == len(found)
    assert found.query_indices.min() >= 0 and found.query_indices.max() < detector.model.num_queries
    by_query = np.argsort(found.query_indices)
    np.testing.assert_allclose(found.box_scores[by_query], scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(found.boxes[by_query], in_query_order, atol=1e-2)


@pytest.mark.model
def test_compiled_detector_pads_to_few_static_shapes_and_gives_the_same_candidates(
    detector, prepared, monkeypatch
):
    """compile: true goes through Dynamo with static shapes (symbolic ones made tracing the Swin
    backbone run for over 10 minutes). Every batch is padded to the batch size and to sides that are
    multiples of COMPILE_SHAPE_STEP, so a smaller batch or other image sizes in the same bucket reuse
    the compilation, and Dynamo's recompile limit covers every padded shape there can be (past it,
    Dynamo would silently run uncompiled). Graphs run by the eager backend here: inductor's code
    generation takes minutes on a CPU, and what this checks is the capture, with the patched attention;
    the candidates equal an uncompiled detector's padded the same way."""
    from torch._dynamo import config as dynamo

    from pseudolabel.models.grounding_dino import COMPILE_SHAPE_STEP, compiled_shapes

    compiled, graphs, real_compile = [], [], torch.compile

    def count_graphs(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def compile_eagerly(module, **options):
        compiled.append(options)
        return real_compile(module, backend=count_graphs, **options)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    limits = dynamo.recompile_limit, dynamo.accumulated_recompile_limit
    torch._dynamo.reset()
    try:
        kwargs = dict(device=detector.device, batch_size=2, image_size=SHORT, max_size=LONG)
        fast = GroundingDinoDetector(detector.model, compile=True, **kwargs)
        padded = GroundingDinoDetector(detector.model, **kwargs)
        padded.shape_step = COMPILE_SHAPE_STEP  # the same padding, uncompiled
        assert compiled == [{"dynamic": False}] * 2  # the backbone and the transformer
        assert dynamo.recompile_limit >= compiled_shapes(LONG) == 4
        assert fast.describe()["padded_shapes"] == f"batch of 2, sides multiples of {COMPILE_SHAPE_STEP} px"
        assert "padded_shapes" not in detector.describe()
        # 170x128 alone, 153x128 alone: one padded shape (2, 3, 128, 256); both 170x128 and 90x160: another.
        other = fast.prepare("other", random_jpeg(180, 150, seed=5))
        counts = []
        for batch in ([prepared[0]], [other], prepared):
            want = padded.detect(batch, [CAPTION], box_floor=0.05, text_floor=0.0, max_candidates=50)
            got = fast.detect(batch, [CAPTION], box_floor=0.05, text_floor=0.0, max_candidates=50)
            counts.append(len(graphs))
            assert len(got) == len(batch)
            for a, b in zip(got, want, strict=True):
                assert len(a) == len(b) > 0 and a.phrases == b.phrases
                np.testing.assert_allclose(a.box_scores, b.box_scores, atol=1e-5)
                np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        assert 0 < counts[0] == counts[1] < counts[2]  # the second batch compiled nothing new
    finally:
        torch._dynamo.reset()
        dynamo.recompile_limit, dynamo.accumulated_recompile_limit = limits


def test_compiled_shapes_bound_dynamo_s_work():
    from pseudolabel.models.grounding_dino import compiled_shapes

    assert compiled_shapes(1333) == 11 * 11 and compiled_shapes(224) == 4 and compiled_shapes(256) == 4


@pytest.mark.model
def test_mixed_batch_results_are_per_image_sorted_and_in_bounds(detector, prepared):
    results = detector.detect(prepared, [CAPTION], box_floor=0.05, text_floor=0.05, max_candidates=7)
    assert [r.image_id for r in results] == ["img0", "img1"]
    for result, item in zip(results, prepared, strict=True):
        assert (result.width, result.height) == (item.width, item.height)
        assert (
            0 < len(result) <= 7
            and result.boxes.shape == (len(result), 4)
            and result.boxes.dtype == np.float32
        )
        assert np.all(np.diff(result.box_scores) <= 0)
        assert np.all(result.text_scores <= result.box_scores + 1e-6)
        assert np.all(result.boxes[:, [0, 1]] <= result.boxes[:, [2, 3]])
        assert np.all(result.boxes >= 0) and np.all(result.boxes[:, [0, 2]] <= item.width)
        assert np.all(result.boxes[:, [1, 3]] <= item.height)
        assert set(result.phrases) <= {"potted plant", "flower"}


@pytest.mark.model
def test_floors_empty_results_and_per_class_merge(detector, prepared):
    (empty,) = detector.detect(prepared[:1], [CAPTION], box_floor=1.0, text_floor=0.0, max_candidates=10)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.phrases == []

    merged = detector.detect(
        prepared, split_caption(CAPTION), box_floor=0.05, text_floor=0.05, max_candidates=1000
    )
    single = {
        c: detector.detect(prepared, [c], box_floor=0.05, text_floor=0.05, max_candidates=1000)
        for c in split_caption(CAPTION)
    }
    queries = detector.model.num_queries
    for i, result in enumerate(merged):
        assert len(result) == sum(len(single[c][i]) for c in single)  # union of the per-class runs
        assert set(result.phrases) == {"potted plant", "flower"}
        assert np.all(np.diff(result.box_scores) <= 0)
        # Query indices: caption_index * num_queries + the query index of the single-caption run.
        expected = [k * queries + q for k, c in enumerate(single) for q in single[c][i].query_indices]
        assert sorted(result.query_indices.tolist()) == sorted(expected)


@pytest.mark.model
def test_each_caption_is_encoded_once(detector, prepared, monkeypatch):
    calls = []
    original = detector.model.bert.forward
    monkeypatch.setattr(detector.model.bert, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    detector._captions.clear()
    for _ in range(3):
        detector.detect(prepared, ["weed .", "tree ."], box_floor=0.05, text_floor=0.05, max_candidates=5)
    assert len(calls) == 2


def test_text_encoder_errors_say_how_to_fix(tmp_path):
    with pytest.raises(TextEncoderNotFound, match="local directory") as info:
        build_grounding_dino("swint_ogc", None, str(tmp_path / "no-bert"))
    assert str(tmp_path / "no-bert") in str(info.value)
    with pytest.raises(TextEncoderNotFound, match="bert-base-uncased"):
        build_grounding_dino("swint_ogc", None, "roberta-large")
    with pytest.raises(ValueError, match="swint_ogc"):
        build_grounding_dino("swin_giant", None, str(tmp_path))


def test_spec_refuses_bad_combinations_without_building(tmp_path):
    with pytest.raises(ModelConfigError, match="random"):
        load_detector(DetectorSpec(tiny=True, checkpoint="", cache_dir=str(tmp_path)))
    with pytest.raises(ModelConfigError, match="swint_ogc"):
        load_detector(DetectorSpec(variant="swin_giant"))
    offline = DetectorSpec(cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(CheckpointNotFound, match="groundingdino_swint_ogc.pth"):
        load_detector(offline)


def test_pretrained_weights_never_fall_back_to_the_cpu(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"not really a checkpoint")
    with pytest.raises(ModelConfigError, match="would run on the CPU"):
        load_detector(DetectorSpec(checkpoint=str(checkpoint), cache_dir=str(tmp_path)))


@pytest.mark.model
def test_spec_describes_a_smoke_run(tmp_path):
    """device / precision "auto": the first GPU in bf16 where there is one, else the CPU in fp32."""
    spec = DetectorSpec(checkpoint="random", tiny=True, text_encoder="tiny-random", cache_dir=str(tmp_path))
    identity = load_detector(spec).describe()
    assert identity["smoke_run"] is True and identity["weights"] == "random"
    gpu = torch.cuda.is_available()
    assert identity["device"] == ("cuda:0" if gpu else "cpu")
    assert identity["precision"] == ("bf16" if gpu else "fp32")
    assert identity["input_size"] == f"short {SHORT} / max {LONG}"


@pytest.mark.model
def test_prepare_handles_grayscale_jpeg(detector):
    buffer = io.BytesIO()
    Image.new("L", (50, 40), 128).save(buffer, format="JPEG")
    item = detector.prepare("gray", buffer.getvalue())
    assert item.pixels.shape[0] == 3 and (item.width, item.height) == (50, 40)


def test_deformable_attention_matches_groundingdino_without_syncs():
    """The patched fallback (level sizes as ints) equals groundingdino's original, and reads nothing back."""
    from pseudolabel.models.grounding_dino_patch import deformable_attention, originals
    from pseudolabel.models.runtime import counting_syncs

    shapes = [(12, 9), (6, 5), (3, 3)]
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, generator=generator)
    locations = torch.rand(2, 7, 4, len(shapes), 3, 2, generator=generator)
    weights = torch.rand(2, 7, 4, len(shapes), 3, generator=generator)
    spatial = torch.tensor(shapes)
    reference = originals()["attention"](value, spatial, locations, weights)
    with counting_syncs(emulate_device=True) as syncs:
        ours = deformable_attention(value, shapes, locations, weights)
    assert syncs.count == 0
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(
        deformable_attention(value, spatial, locations, weights), reference, rtol=0, atol=0
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("corners", [2, 4])
def test_patched_attention_module_matches_groundingdino(batch_first, corners):
    """MultiScaleDeformableAttention.forward: groundingdino's (with its own fallback) vs the patched one,
    for point and box reference points, with a padding mask; the patched one reads nothing back."""
    from groundingdino.models.GroundingDINO import ms_deform_attn

    from pseudolabel.models import grounding_dino_patch
    from pseudolabel.models.runtime import counting_syncs

    grounding_dino_patch.install()
    torch.manual_seed(0)
    shapes = [(10, 7), (5, 4), (3, 2)]
    module = ms_deform_attn.MultiScaleDeformableAttention(
        embed_dim=32, num_heads=4, num_levels=len(shapes), num_points=3, batch_first=batch_first
    ).eval()
    for parameter in module.parameters():  # its init zeroes the offsets' weights: make them matter
        torch.nn.init.normal_(parameter, std=0.3)
    values = sum(h * w for h, w in shapes)
    query, value, position = torch.randn(2, 11, 32), torch.randn(2, values, 32), torch.randn(2, 11, 32)
    if not batch_first:
        query, value, position = (t.transpose(0, 1) for t in (query, value, position))
    padding = torch.zeros(2, values, dtype=torch.bool)
    padding[1, -9:] = True
    arguments = dict(
        query=query,
        value=value,
        query_pos=position,
        key_padding_mask=padding,
        reference_points=torch.rand(2, 11, len(shapes), corners),
        spatial_shapes=torch.tensor(shapes),
    )
    levels = [torch.empty(1, 1, h, w) for h, w in shapes]
    with torch.no_grad():
        with grounding_dino_patch.uninstalled():
            reference = module(**arguments)
        with counting_syncs(emulate_device=True) as syncs, grounding_dino_patch.spatial_shapes(levels):
            ours = grounding_dino_patch.deformable_attention_forward(module, **arguments)
        assert syncs.count == 0
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        with pytest.raises(ValueError, match="hold"):
            wrong = {**arguments, "spatial_shapes": torch.tensor(shapes[:2])}
            grounding_dino_patch.deformable_attention_forward(module, **wrong)


@pytest.fixture(scope="module")
def deeper(bert_dir, device):
    """The tiny model with 2 encoder and 3 decoder layers: each decoder layer refines the boxes the next reads."""
    overrides = {**tiny.TINY_GROUNDING_DINO, "enc_layers": 2, "dec_layers": 3}
    model = build_grounding_dino("swint_ogc", None, str(bert_dir), overrides=overrides)
    return GroundingDinoDetector(model, device=device, batch_size=2, image_size=SHORT, max_size=LONG)


@pytest.mark.model
@pytest.mark.parametrize("which", ["detector", "deeper"])
def test_patched_transformer_equals_groundingdino_s_own_and_detect_reads_back_once(which, prepared, request):
    """The whole model with groundingdino's own level-size readers and decoder loop restored vs patched:
    equal bit for bit. A detect call then reads the device once (the scores), instead of several times
    per feature level, attention call and decoder layer. One blocking upload per caption is left:
    groundingdino's transformer builds its level-size tensor from a Python list (``torch.as_tensor``
    with a device: PyTorch waits for the stream after that pageable copy)."""
    from pseudolabel.models.grounding_dino_patch import uninstalled
    from pseudolabel.models.runtime import H2D, counting_syncs

    detector = request.getfixturevalue(which)
    emulate = detector.device.type == "cpu"  # a CPU run counts what a CUDA run would
    samples = detector._batch_tensor(prepared)
    captions = [normalize_caption(CAPTION)] * len(prepared)
    detector.detect(prepared, [CAPTION])  # caption encoded outside the counts
    with uninstalled(), torch.no_grad():
        reference = detector.model(samples, captions=captions)
        with counting_syncs(emulate_device=emulate) as unpatched:
            detector.detect(prepared, [CAPTION])
    with torch.no_grad():
        patched = detector.model(samples, captions=captions)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(patched[key], reference[key], rtol=0, atol=0)

    with counting_syncs(emulate_device=emulate) as syncs:
        detector.detect(prepared, [CAPTION])
    read = "cpu" if emulate else "event.synchronize"  # the scores' copy
    assert syncs.by_kind == {read: 1, H2D: 1}, syncs.by_kind
    assert unpatched.count - unpatched.by_kind.get(H2D, 0) > 3, unpatched.by_kind
