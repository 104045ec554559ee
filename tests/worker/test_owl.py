"""OwlDetector (OWLv2, OWL-ViT) on the real transformers architectures: tiny config, random weights,
a locally generated CLIP tokenizer; no downloads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from images import random_jpeg
from PIL import Image

from pseudolabel.models import owl
from pseudolabel.models.interfaces import phrases_of
from pseudolabel.models.loading import DetectorSpec, ModelConfigError, load_detector
from pseudolabel.models.runtime import counting_syncs

CAPTION = "potted plant . flower ."
SIZES = [(200, 150), (90, 160)]  # landscape, portrait: both fit the 96 px square exactly (96x72, 54x96)
ALL = {"box_floor": 0.0, "text_floor": 0.0, "max_candidates": 10_000}


def tiny_spec(backend: str, **changes) -> DetectorSpec:
    return DetectorSpec(
        backend=backend, checkpoint="random", tiny=True, device="cpu", batch_size=2, **changes
    )


@pytest.fixture(scope="module")
def detectors():
    return {backend: load_detector(tiny_spec(backend)) for backend in ("owlv2", "owlvit")}


@pytest.fixture(scope="module")
def images():
    return [random_jpeg(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


def prepared(detector, images):
    return [detector.prepare(f"img{i}", data) for i, data in enumerate(images)]


def test_load_owl_offline_describes_a_smoke_run(detectors):
    v2, v1 = detectors["owlv2"], detectors["owlvit"]
    assert isinstance(v2, owl.OwlDetector) and type(v2.model).__name__ == "Owlv2ForObjectDetection"
    assert type(v1.model).__name__ == "OwlViTForObjectDetection"
    info = v2.describe()
    assert info["backend"] == "owlv2" and info["variant"] == "base-patch16-ensemble-tiny"
    assert info["image_size"] == 96 and info["input_size"] == "96x96 padded to a square"
    assert info["smoke_run"] is True and info["weights"] == "random"
    assert v1.describe()["input_size"] == "96x96 stretched to a square"
    assert v2.num_patches == v1.num_patches == 36


def test_prepare_keeps_the_aspect_inside_the_square(detectors, images):
    v2, v1 = (prepared(detectors[b], images) for b in ("owlv2", "owlvit"))
    assert [(p.width, p.height) for p in v2] == SIZES
    assert [tuple(p.pixels.shape) for p in v2] == [(3, 72, 96), (3, 96, 54)]
    assert [tuple(p.pixels.shape) for p in v1] == [(3, 96, 96), (3, 96, 96)]
    assert detectors["owlv2"].input_size(1000, 10) == (96, 1)  # never a zero-pixel side


@pytest.mark.parametrize("backend", ["owlv2", "owlvit"])
def test_pixels_match_the_transformers_processor(detectors, backend):
    """Padding (OWLv2: grey, bottom/right) and normalisation as the released processors; the resize
    filters differ slightly (PIL vs torchvision), so a smooth image is compared."""
    from transformers import Owlv2ImageProcessorFast, OwlViTImageProcessorFast

    y, x = np.mgrid[0:150, 0:200]
    array = np.stack([x * 255 / 200, y * 255 / 150, (x + y) * 255 / 350], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    detector = detectors[backend]
    mine = detector.pixel_batch([detector.prepare("smooth", buffer.getvalue())])
    square = {"height": 96, "width": 96}
    processor = (
        Owlv2ImageProcessorFast(size=square)
        if backend == "owlv2"
        else OwlViTImageProcessorFast(size=square, crop_size=square, do_normalize=True)
    )
    reference = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    assert mine.shape == reference.shape == (1, 3, 96, 96)
    assert (mine - reference).abs().mean() < 0.02
    if backend == "owlv2":  # rows 72.. are padding: identical
        torch.testing.assert_close(mine[..., 73:, :], reference[..., 73:, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["owlv2", "owlvit"])
def test_detect_matches_the_transformers_forward_and_post_processing(detectors, images, backend):
    from transformers import Owlv2ImageProcessorFast, OwlViTImageProcessorFast

    detector = detectors[backend]
    batch = prepared(detector, images)
    found = detector.detect(batch, [CAPTION], **ALL)
    phrases = phrases_of(CAPTION)
    tokens = detector.tokenizer(
        phrases * len(batch), padding="max_length", max_length=16, return_tensors="pt"
    )
    with torch.inference_mode():
        reference = detector.model(**tokens, pixel_values=detector.pixel_batch(batch))
    # OWLv2's processor scales boxes by the long side (the padded square); exact here as both sizes
    # resize without rounding. OWL-ViT's boxes are relative to the stretched image: scale by (w, h).
    target_sizes = [(max(w, h), max(w, h)) if backend == "owlv2" else (h, w) for w, h in SIZES]
    processor = Owlv2ImageProcessorFast() if backend == "owlv2" else OwlViTImageProcessorFast()
    post = processor.post_process_object_detection(reference, threshold=0.0, target_sizes=target_sizes)
    for i, (candidates, (w, h)) in enumerate(zip(found, SIZES, strict=True)):
        assert len(candidates) == 36 and (candidates.width, candidates.height) == (w, h)
        assert np.all(np.diff(candidates.box_scores) <= 0)  # sorted, best first
        patch = candidates.query_indices
        assert sorted(patch) == list(range(36))
        class_scores = post[i]["scores"].numpy()[patch]
        np.testing.assert_allclose(
            candidates.boxes, post[i]["boxes"].clamp(min=0).numpy()[patch].clip(max=[w, h, w, h]), atol=1e-3
        )
        assert candidates.phrases == [phrases[k] for k in post[i]["labels"].numpy()[patch]]
        if backend == "owlv2":
            objectness = reference.objectness_logits[i].sigmoid().numpy()[patch]
            np.testing.assert_allclose(candidates.box_scores, objectness, atol=1e-5)
            np.testing.assert_allclose(candidates.text_scores, class_scores, atol=1e-5)
        else:  # no objectness head: the class score is the box score, the text score is not produced
            np.testing.assert_allclose(candidates.box_scores, class_scores, atol=1e-5)
            assert np.isnan(candidates.text_scores).all()
        assert candidates.boxes.dtype == np.float32 and candidates.query_indices.dtype == np.int32


@pytest.mark.parametrize(
    "backend, box, expected",
    [
        # OWLv2 input: the landscape image fills rows 0..72 of the 96 square, the portrait columns 0..54.
        ("owlv2", (0.75, 0.375, 0.5, 0.75), [(100, 0, 200, 150), (80, 0, 90, 120)]),
        ("owlv2", (0.140625, 0.75, 0.28125, 0.5), [(0, 100, 56.25, 150), (0, 80, 45, 160)]),
        # OWL-ViT stretches: normalised boxes scale by (w, h).
        ("owlvit", (0.75, 0.25, 0.5, 0.5), [(100, 0, 200, 75), (45, 0, 90, 80)]),
    ],
)
def test_boxes_come_back_in_original_pixels(detectors, images, monkeypatch, backend, box, expected):
    detector = detectors[backend]
    predict = detector._predict

    def known_box(pixels, queries):
        logits, boxes, objectness = predict(pixels, queries)
        return logits, torch.tensor(box).expand_as(boxes), objectness

    monkeypatch.setattr(detector, "_predict", known_box)
    found = detector.detect(prepared(detector, images), [CAPTION], **ALL)
    for candidates, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(candidates.boxes, np.tile(want, (36, 1)), atol=1e-3)


def test_floors_and_max_candidates(detectors, images):
    detector = detectors["owlv2"]
    batch = prepared(detector, images)
    everything = detector.detect(batch, [CAPTION], **ALL)
    box_floor = float(np.median(everything[0].box_scores))
    text_floor = float(np.median(everything[0].text_scores))
    floored = detector.detect(
        batch, [CAPTION], box_floor=box_floor, text_floor=text_floor, max_candidates=100
    )
    for full, kept in zip(everything, floored, strict=True):
        want = (full.box_scores > box_floor) & (full.text_scores > text_floor)
        assert 0 < len(kept) < len(full) and list(kept.query_indices) == list(full.query_indices[want])
    capped = detector.detect(batch, [CAPTION], **{**ALL, "max_candidates": 5})
    for full, top in zip(everything, capped, strict=True):
        assert list(top.query_indices) == list(full.query_indices[:5])
        np.testing.assert_array_equal(top.boxes, full.boxes[:5])
    assert [len(c) for c in detector.detect(batch, [CAPTION], box_floor=1.0, text_floor=0.0)] == [0, 0]
    assert [len(c) for c in detector.detect(batch, [CAPTION], **{**ALL, "max_candidates": 0})] == [0, 0]
    # OWL-ViT has no text score: its floor does not apply.
    v1 = detectors["owlvit"]
    assert len(v1.detect(prepared(v1, images)[:1], [CAPTION], box_floor=0.0, text_floor=0.99)[0]) == 36


@pytest.mark.parametrize("backend", ["owlv2", "owlvit"])
def test_mixed_sizes_in_one_batch_equal_single_images(detectors, images, backend):
    detector = detectors[backend]
    batch = prepared(detector, images)
    together = detector.detect(batch, [CAPTION], **ALL)
    for item, joint in zip(batch, together, strict=True):
        (alone,) = detector.detect([item], [CAPTION], **ALL)
        assert alone.image_id == joint.image_id and alone.phrases == joint.phrases
        np.testing.assert_array_equal(alone.query_indices, joint.query_indices)
        np.testing.assert_allclose(alone.boxes, joint.boxes, atol=1e-3)
        np.testing.assert_allclose(alone.box_scores, joint.box_scores, atol=1e-5)


def test_one_caption_per_class_and_captions_encoded_once(detectors, images, monkeypatch):
    detector = owl.OwlDetector(
        detectors["owlv2"].model, detectors["owlv2"].tokenizer, device=torch.device("cpu")
    )
    batch = prepared(detector, images)
    calls = []
    tokenizer = detector.tokenizer
    monkeypatch.setattr(detector, "tokenizer", lambda *a, **k: calls.append(a[0]) or tokenizer(*a, **k))
    merged = detector.detect(batch, ["potted plant .", "flower ."], **ALL)
    singles = [detector.detect(batch, [caption], **ALL) for caption in ("potted plant .", "flower .")]
    assert calls == [["potted plant", "flower"]]  # each phrase through the text tower once
    for i, candidates in enumerate(merged):
        assert len(candidates) == 72 and len(set(candidates.query_indices)) == 72
        for c, phrase in enumerate(["potted plant", "flower"]):
            rows = candidates.query_indices // 36 == c
            assert {candidates.phrases[r] for r in np.flatnonzero(rows)} == {phrase}
            alone = singles[c][i]
            order = np.argsort(candidates.query_indices[rows])
            np.testing.assert_allclose(
                candidates.text_scores[rows][order],
                alone.text_scores[np.argsort(alone.query_indices)],
                atol=1e-6,
            )


def test_a_batch_reaches_the_host_in_one_copy(detectors, images):
    detector = detectors["owlv2"]
    batch = prepared(detector, images)
    detector.detect(batch, [CAPTION])  # text queries cached
    with counting_syncs(emulate_device=True) as syncs:
        found = detector.detect(batch, [CAPTION], **ALL)
    assert syncs.count == 1, syncs.by_kind
    assert [len(c) for c in found] == [36, 36]


def test_identity_follows_variant_and_checkpoint(detectors, images, tmp_path):
    def differs(a, b) -> set[str]:
        one, two = a.describe(), b.describe()
        return {key for key in one.keys() | two.keys() if one.get(key) != two.get(key)}

    v2 = detectors["owlv2"]
    seed1 = load_detector(tiny_spec("owlv2", seed=1))
    assert differs(v2, load_detector(tiny_spec("owlv2", variant="large-patch14-ensemble"))) == {"variant"}
    assert differs(v2, seed1) == {"seed"}
    assert {"backend", "model", "variant"} <= differs(v2, detectors["owlvit"])
    # A local save_pretrained directory: its weights' digest is the identity, and it detects the same.
    for seed, source in enumerate([v2, seed1]):
        source.model.save_pretrained(tmp_path / f"seed{seed}")
        source.tokenizer.save_pretrained(tmp_path / f"seed{seed}")
    local = [
        load_detector(DetectorSpec(backend="owlv2", checkpoint=str(tmp_path / f"seed{s}"), device="cpu"))
        for s in (0, 1)
    ]
    digests = [detector.describe()["checkpoint_sha256"] for detector in local]
    assert None not in digests and digests[0] != digests[1]
    assert local[0].describe()["weights"] == "pretrained" and local[0].image_size == 96
    batch = prepared(local[0], images)
    for a, b in zip(
        local[0].detect(batch, [CAPTION], **ALL),
        detectors["owlv2"].detect(batch, [CAPTION], **ALL),
        strict=True,
    ):
        np.testing.assert_array_equal(a.query_indices, b.query_indices)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    # Another input size interpolates the position embeddings: 8 x 8 patches.
    bigger = load_detector(
        DetectorSpec(backend="owlv2", checkpoint=str(tmp_path / "seed0"), device="cpu", image_size=128)
    )
    assert bigger.describe()["image_size"] == 128
    found = bigger.detect(prepared(bigger, images), [CAPTION], **ALL)
    assert [len(c) for c in found] == [64, 64] and all((c.boxes[:, 2] <= c.width).all() for c in found)
    with pytest.raises(ModelConfigError, match="holds a 'owlv2' model, but the backend is 'owlvit'"):
        load_detector(DetectorSpec(backend="owlvit", checkpoint=str(tmp_path / "seed0"), device="cpu"))


def test_unknown_variant_and_bad_sizes_are_clear_errors():
    with pytest.raises(
        ModelConfigError, match=r"unknown owlv2 variant 'huge'; one of \['base-patch16-ensemble'"
    ):
        load_detector(tiny_spec("owlv2", variant="huge"))
    with pytest.raises(ModelConfigError, match=r"unknown owlvit variant 'huge'; one of \['base-patch32'"):
        owl.load_owl(tiny_spec("owlvit", variant="huge"))  # the builder checks too, not only the spec
    with pytest.raises(ModelConfigError, match="not a multiple of the patch size 16"):
        load_detector(tiny_spec("owlv2", image_size=100))
