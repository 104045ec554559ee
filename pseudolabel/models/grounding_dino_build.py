"""Grounding DINO variants and model building: config, text encoder, checkpoint weights, and the
detector a :class:`~pseudolabel.models.loading.DetectorSpec` describes."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointSpec
from pseudolabel.models.grounding_dino import GroundingDinoDetector
from pseudolabel.models.loading import (
    GROUNDING_DINO,
    TINY_RANDOM_TEXT_ENCODER,
    DetectorSpec,
    spec_checkpoint,
    spec_identity,
    spec_runtime,
)
from pseudolabel.models.runtime import seeded

_RELEASES = "https://github.com/IDEA-Research/GroundingDINO/releases/download"


@dataclass(frozen=True)
class DinoVariant:
    config_file: str  # file name inside groundingdino/config
    checkpoint: CheckpointSpec


VARIANTS: dict[str, DinoVariant] = {
    "swint_ogc": DinoVariant(
        "GroundingDINO_SwinT_OGC.py",
        CheckpointSpec(
            "Grounding DINO swint_ogc",
            "groundingdino_swint_ogc.pth",
            f"{_RELEASES}/v0.1.0-alpha/groundingdino_swint_ogc.pth",
            # Same digest published independently by several projects that pin this release file.
            "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799",
        ),
    ),
    "swinb_cogcoor": DinoVariant(
        "GroundingDINO_SwinB_cfg.py",
        CheckpointSpec(
            "Grounding DINO swinb_cogcoor",
            "groundingdino_swinb_cogcoor.pth",
            f"{_RELEASES}/v0.1.0-alpha2/groundingdino_swinb_cogcoor.pth",
            None,  # not pinned: recorded on first download (see checkpoints.py)
        ),
    ),
}
DEFAULT_VARIANT = "swint_ogc"
DEFAULT_TEXT_ENCODER = "bert-base-uncased"


class TextEncoderNotFound(FileNotFoundError):
    """The BERT text encoder (tokenizer + weights) could not be loaded."""


def load_grounding_dino(spec: DetectorSpec) -> GroundingDinoDetector:
    """The detector ``spec`` describes: checkpoint fetched and verified, model built and placed."""
    resolved = spec_checkpoint(spec, VARIANTS[spec.variant].checkpoint)
    device, precision = spec_runtime(spec, resolved)
    model = build_grounding_dino(
        spec.variant,
        resolved.path,
        text_encoder_dir(spec),
        overrides=tiny.TINY_GROUNDING_DINO if spec.tiny else None,
        seed=spec.seed,
    )
    info = {
        "model": GROUNDING_DINO,
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        "text_encoder": spec.text_encoder,
        **spec_identity(spec, resolved),
    }
    return GroundingDinoDetector(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        image_size=spec.image_size or (tiny.TINY_DINO_IMAGE_SIZE if spec.tiny else 800),
        max_size=spec.max_size or (tiny.TINY_DINO_MAX_SIZE if spec.tiny else 1333),
        compile=spec.compile,
        decode_on_device=spec.decode_on_device,
        info=info,
    )


def text_encoder_dir(spec: DetectorSpec) -> str:
    """The spec's text encoder; "tiny-random" is generated once per seed into the model cache."""
    if spec.text_encoder != TINY_RANDOM_TEXT_ENCODER:
        return spec.text_encoder
    target = spec.cache() / f"tiny-random-bert-{spec.seed}"
    if not (target / "config.json").is_file():
        # Build beside the target, then rename: concurrent workers never see a half-written directory.
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tiny-bert-", dir=target.parent))
        tiny.write_bert_dir(scratch, seed=spec.seed)
        try:
            os.replace(scratch, target)
        except OSError:  # another worker got there first
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def build_grounding_dino(
    variant: str = DEFAULT_VARIANT,
    checkpoint: Path | None = None,
    text_encoder: str = DEFAULT_TEXT_ENCODER,
    *,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build the variant's architecture on the CPU; load ``checkpoint`` or keep a seeded random init.

    ``text_encoder`` is a local directory (config.json, vocab.txt, weights) or a Hugging Face hub name
    (bert-base-uncased, read from the hub cache or downloaded). ``overrides`` replace config entries
    (see :mod:`pseudolabel.models.tiny`).
    """
    from groundingdino import config as dino_configs
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown Grounding DINO variant {variant!r}; expected one of {sorted(VARIANTS)}")
    _check_text_encoder(text_encoder)
    args = SLConfig.fromfile(str(Path(dino_configs.__file__).parent / VARIANTS[variant].config_file))
    args.text_encoder_type = text_encoder
    args.device = "cpu"
    # Activation checkpointing only saves memory when training; for inference it is pure overhead.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    for key, value in (overrides or {}).items():
        setattr(args, key, value)
    try:
        with seeded(seed), contextlib.redirect_stdout(io.StringIO()):  # groundingdino prints while building
            model = build_model(args)
    except OSError as exc:
        raise TextEncoderNotFound(_text_encoder_message(text_encoder, repr(exc))) from exc
    if checkpoint is not None:
        _load_weights(model, checkpoint)
    return model.eval()


def _check_text_encoder(text_encoder: str) -> None:
    looks_like_path = text_encoder.startswith((".", "/", "~")) or "\\" in text_encoder
    if looks_like_path and not Path(text_encoder).expanduser().is_dir():
        raise TextEncoderNotFound(_text_encoder_message(text_encoder, "no such directory"))
    if not looks_like_path and text_encoder not in ("bert-base-uncased",) and not Path(text_encoder).is_dir():
        raise TextEncoderNotFound(
            _text_encoder_message(
                text_encoder, "groundingdino only accepts 'bert-base-uncased' or a local directory"
            )
        )


def _text_encoder_message(text_encoder: str, why: str) -> str:
    return (
        f"Grounding DINO text encoder {text_encoder!r} could not be loaded ({why}). Provide a local directory "
        f"with config.json, vocab.txt/tokenizer files and model weights (e.g. `huggingface-cli download "
        f"bert-base-uncased --local-dir DIR` on a machine with network, then copy DIR here) and set the "
        f"resource's text_encoder to DIR; or make bert-base-uncased available in the Hugging Face cache "
        f"(HF_HOME)."
    )


def _load_weights(model: nn.Module, path: Path) -> None:
    from groundingdino.util.misc import clean_state_dict

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The official release pickles more than tensors. The file's sha256 was verified before we
        # get here (checkpoints.py), so unpickling it is no more trust than using it at all.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    result = model.load_state_dict(clean_state_dict(state), strict=False)
    if result.missing_keys:
        # Unexpected keys are normal (e.g. the training-only label_enc); missing ones mean a wrong variant.
        raise RuntimeError(
            f"checkpoint {path} does not fit this Grounding DINO variant: {len(result.missing_keys)} missing "
            f"weights, e.g. {result.missing_keys[:5]}"
        )
