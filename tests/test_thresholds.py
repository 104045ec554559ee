"""The thresholds file: strict parsing and a fingerprint that tracks values, not formatting."""

from __future__ import annotations

import pytest
import yaml

from pseudolabel.labels import thresholds as thresholds_module
from pseudolabel.labels.thresholds import (
    DEFAULT_THRESHOLDS_PATH,
    THRESHOLDS_ENV,
    PickPolicy,
    Thresholds,
    ThresholdsError,
    load_thresholds,
    parse_thresholds,
    thresholds_code_version,
    thresholds_fingerprint,
    thresholds_path,
)

BASE = {
    "version": 1,
    "box_score": 0.35,
    "text_score": 0.25,
    "mask_score": 0.7,
    "min_mask_area_fraction": 0.002,
    "max_box_coverage": 0.8,
    "nms_iou": 0.5,
    "max_instances_per_image": 20,
    "pick_policy": "both_scores_agree",
}


def dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def test_packaged_default_file_parses_with_the_production_coverage_cut():
    thresholds = load_thresholds(DEFAULT_THRESHOLDS_PATH)
    assert thresholds.max_box_coverage == 0.8  # the real pipeline drops boxes covering >= 80 %
    assert thresholds.pick_policy is PickPolicy.BOTH_SCORES_AGREE
    assert thresholds_code_version(thresholds).startswith("thresholds-v1-")


def test_fingerprint_ignores_comments_key_order_and_number_spelling():
    reference = thresholds_fingerprint(parse_thresholds(dump(BASE)))
    reordered = dict(reversed(list(BASE.items())))
    respelled = {
        **BASE,
        "mask_score": 0.70,
        "max_instances_per_image": 20.0,
        "pick_policy": " Both_Scores_Agree ",
    }
    commented = "# tuned on 2024-05-01\n" + dump(BASE).replace(
        "nms_iou: 0.5", "nms_iou: 0.50   # class-aware"
    )
    assert thresholds_fingerprint(parse_thresholds(dump(reordered))) == reference
    assert thresholds_fingerprint(parse_thresholds(dump(respelled))) == reference
    assert thresholds_fingerprint(parse_thresholds(commented)) == reference


@pytest.mark.parametrize(
    "key, value",
    [
        ("version", 2),
        ("box_score", 0.36),
        ("text_score", 0.2),
        ("mask_score", 0.71),
        ("min_mask_area_fraction", 0.01),
        ("max_box_coverage", 0.9),
        ("nms_iou", 0.6),
        ("max_instances_per_image", 5),
        ("pick_policy", "best_mask_score"),
    ],
)
def test_every_value_change_changes_the_fingerprint(key, value):
    before = thresholds_fingerprint(parse_thresholds(dump(BASE)))
    after = thresholds_fingerprint(parse_thresholds(dump({**BASE, key: value})))
    assert before != after


def test_algorithm_version_is_part_of_the_fingerprint(monkeypatch):
    thresholds = parse_thresholds(dump(BASE))
    before = thresholds_code_version(thresholds)
    monkeypatch.setattr(
        thresholds_module, "LABEL_ALGORITHM_VERSION", thresholds_module.LABEL_ALGORITHM_VERSION + 1
    )
    assert thresholds_code_version(thresholds) != before


def test_built_in_code_and_parsed_yaml_fingerprint_alike():
    built = Thresholds(**{**BASE, "pick_policy": PickPolicy.BOTH_SCORES_AGREE, "nms_iou": 1 / 2})
    assert thresholds_fingerprint(built) == thresholds_fingerprint(parse_thresholds(dump(BASE)))


@pytest.mark.parametrize(
    "data, message",
    [
        ({k: v for k, v in BASE.items() if k != "nms_iou"}, "missing \\['nms_iou'\\]"),
        ({**BASE, "box_scor": 0.3}, "unknown \\['box_scor'\\]"),
        ({**BASE, "box_score": 1.5}, "box_score must be in \\[0, 1\\]"),
        ({**BASE, "mask_score": "high"}, "mask_score must be a number"),
        ({**BASE, "text_score": True}, "text_score must be a number"),
        ({**BASE, "max_instances_per_image": 0}, "max_instances_per_image must be >= 1"),
        ({**BASE, "max_instances_per_image": 2.5}, "must be an integer"),
        ({**BASE, "pick_policy": "random"}, "pick_policy must be one of"),
    ],
)
def test_invalid_files_are_rejected_with_the_reason(data, message):
    with pytest.raises(ThresholdsError, match=message):
        parse_thresholds(dump(data))


def test_non_mapping_and_unreadable_files_are_rejected(tmp_path):
    with pytest.raises(ThresholdsError, match="mapping"):
        parse_thresholds("- 1\n- 2\n")
    with pytest.raises(ThresholdsError, match="cannot read"):
        load_thresholds(tmp_path / "missing.yaml")


def test_env_var_points_at_another_file(tmp_path):
    custom = tmp_path / "t.yaml"
    custom.write_text(dump({**BASE, "box_score": 0.5}))
    assert thresholds_path({}) == DEFAULT_THRESHOLDS_PATH
    assert thresholds_path({THRESHOLDS_ENV: "  "}) == DEFAULT_THRESHOLDS_PATH
    assert thresholds_path({THRESHOLDS_ENV: str(custom)}) == custom
    assert load_thresholds(thresholds_path({THRESHOLDS_ENV: str(custom)})).box_score == 0.5


def test_to_dict_round_trips():
    thresholds = parse_thresholds(dump(BASE))
    assert thresholds.to_dict() == {**BASE, "mask_score": 0.7}
    assert parse_thresholds(dump(thresholds.to_dict())) == thresholds


# --- per-class overrides -----------------------------------------------------------------------------

# The packaged file's fingerprint before the optional `classes` section existed (computed from the
# file at that commit): stored labels must not turn stale because the section was added to the parser.
PACKAGED_FINGERPRINT_BEFORE_CLASSES = "c067008a47db67b1"

CLASSES = {"cat": {"box_score": 0.45, "mask_score": 0.8}, "dog": {"box_score": 0.3}}


def test_files_without_classes_keep_the_fingerprint_they_had_before_per_class_overrides():
    packaged = load_thresholds(DEFAULT_THRESHOLDS_PATH)
    assert packaged.classes == ()
    assert thresholds_fingerprint(packaged) == PACKAGED_FINGERPRINT_BEFORE_CLASSES
    assert "classes" not in packaged.to_dict()
    # An empty or key-less section is no section at all.
    for empty in ({**BASE, "classes": None}, {**BASE, "classes": {}}, {**BASE, "classes": {"cat": {}}}):
        assert parse_thresholds(dump(empty)) == parse_thresholds(dump(BASE))


def test_classes_parse_apply_per_class_and_round_trip():
    thresholds = parse_thresholds(dump({**BASE, "classes": CLASSES}))
    assert thresholds.class_overrides == CLASSES
    cat, dog, other = (thresholds.for_class(name) for name in ("cat", "dog", "bird"))
    assert (cat.box_score, cat.mask_score, cat.text_score) == (0.45, 0.8, 0.25)
    assert (dog.box_score, dog.mask_score) == (0.3, 0.7)
    assert other == parse_thresholds(dump(BASE))  # an unlisted class gets the global values
    assert cat.classes == () and cat.nms_iou == thresholds.nms_iou
    assert thresholds.to_dict()["classes"] == CLASSES
    assert parse_thresholds(dump(thresholds.to_dict())) == thresholds
    assert hash(thresholds) == hash(parse_thresholds(dump(thresholds.to_dict())))


def test_class_overrides_change_the_fingerprint_but_not_their_spelling():
    plain = thresholds_fingerprint(parse_thresholds(dump(BASE)))
    with_classes = thresholds_fingerprint(parse_thresholds(dump({**BASE, "classes": CLASSES})))
    reordered = {"dog": {"box_score": 0.30}, "cat": {"mask_score": 0.80, "box_score": 0.45}}
    assert with_classes != plain
    assert thresholds_fingerprint(parse_thresholds(dump({**BASE, "classes": reordered}))) == with_classes
    nudged = {**CLASSES, "dog": {"box_score": 0.31}}
    assert thresholds_fingerprint(parse_thresholds(dump({**BASE, "classes": nudged}))) != with_classes


def test_built_class_overrides_equal_parsed_ones_and_with_overrides_keeps_them():
    parsed = parse_thresholds(dump({**BASE, "classes": CLASSES}))
    built = Thresholds(**{**BASE, "classes": CLASSES})
    assert built == parsed
    stepwise = (
        parse_thresholds(dump(BASE))
        .with_class_overrides("dog", box_score=0.3)
        .with_class_overrides("cat", box_score=0.45)
        .with_class_overrides("cat", mask_score=0.8)
    )
    assert stepwise == parsed
    changed = parsed.with_overrides(nms_iou=0.6)
    assert changed.classes == parsed.classes and changed.nms_iou == 0.6


@pytest.mark.parametrize(
    "classes, message",
    [
        ({"cat": {"box_scor": 0.3}}, "classes.cat: unknown keys \\['box_scor'\\]"),
        ({"cat": {"nms_iou": 0.3}}, "classes.cat: unknown keys \\['nms_iou'\\] \\(nms_iou can only be set"),
        ({"dog": {"pick_policy": "all"}}, "classes.dog: unknown keys \\['pick_policy'\\]"),
        ({"cat": {"mask_score": 1.2}}, "classes.cat.mask_score must be in \\[0, 1\\]"),
        ({"cat": {"box_score": "high"}}, "classes.cat.box_score must be a number"),
        ({"cat": {"text_score": True}}, "classes.cat.text_score must be a number"),
        ({"cat": 0.3}, "classes.cat must be a mapping"),
        (["cat"], "classes must be a mapping"),
        ({1: {"box_score": 0.3}}, "class names must be non-empty strings"),
    ],
)
def test_invalid_classes_are_rejected_naming_class_and_key(classes, message):
    with pytest.raises(ThresholdsError, match=message):
        parse_thresholds(dump({**BASE, "classes": classes}))
