"""Small random-weight model settings for tests, the offline demo and CPU smoke benchmarks.

These build the REAL Grounding DINO / SAM2 code paths with fewer layers and smaller inputs. Their
outputs are meaningless: anything run with them is a smoke run, never a quality measurement.
"""

from __future__ import annotations

from pathlib import Path

from pseudolabel.models.runtime import seeded

# Tokens BertTokenizer and Grounding DINO require ([CLS] [SEP] . ? delimit phrases), then prompt words.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ","]
PROMPT_WORDS = ["plant", "plants", "flower", "leaf", "leaves", "tree", "potted", "seedling", "weed", "crop"]

# Grounding DINO: Swin-T backbone as is (its size is fixed by name), 1+1 transformer layers, few queries.
# hidden_dim stays 256: the text enhancer's positional embedding is hard-wired to 256 features.
TINY_GROUNDING_DINO = {"enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64, "num_queries": 30}
TINY_DINO_IMAGE_SIZE = 128  # short side
TINY_DINO_MAX_SIZE = 224

TINY_SAM2_IMAGE_SIZE = 128


def tiny_sam2_overrides(image_size: int = TINY_SAM2_IMAGE_SIZE) -> list[str]:
    """Hydra overrides shrinking SAM2.1 hiera_t: 5 Hiera blocks at width 32, one memory layer."""
    return [
        f"++model.image_size={image_size}",
        "++model.image_encoder.trunk.embed_dim=32",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        # a global-attention block must not be a q-pool block (1, 2, 4 here)
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
        "++model.memory_attention.num_layers=1",
    ]


def write_bert_dir(
    directory: str | Path, *, size: str = "tiny", words: list[str] | None = None, seed: int = 0
) -> Path:
    """Write a random-weight BERT text encoder + WordPiece vocab that ``from_pretrained`` can load.

    ``size="tiny"``: 1 layer, hidden 32 (tests, demo). ``size="base"``: bert-base-uncased's
    architecture (12 layers, hidden 768) for benchmarks that must pay the real text-encoder cost.
    Only the vocab is small; words outside it tokenize to [UNK].
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + PROMPT_WORDS + list(words or [])))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if size == "tiny":
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
        )
    elif size == "base":
        config = BertConfig(vocab_size=len(vocab))
    else:
        raise ValueError(f"size must be 'tiny' or 'base', got {size!r}")
    with seeded(seed):
        model = BertModel(config)
    model.save_pretrained(directory)
    BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    return directory


# DINOv2 (dinov2_saliency): the real transformers Dinov2Model at width 32, 2 layers, 2 heads, with the
# released patch size (14); the 4 x 4 position grid is interpolated to each input like the real 37 x 37.
TINY_DINOV2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "image_size": 56,
    "patch_size": 14,
    # 10x the released init scale: at 0.02 random attention is nearly uniform (one region covering the
    # image); 0.2 gives uneven maps, so smoke runs exercise several regions. Says nothing about quality.
    "initializer_range": 0.2,
}
TINY_DINOV2_IMAGE_SIZE = 112  # short side (8 patches)
TINY_DINOV2_MAX_SIZE = 196  # long-side cap (14 patches)


# OWLv2 / OWL-ViT (owlv2, owlvit): the real transformers detection models with 1-layer, width-32 text and
# vision towers; 96 px inputs in 16 px patches = 6 x 6 = 36 patch boxes per image.
TINY_OWL_IMAGE_SIZE = 96
TINY_OWL_PATCH_SIZE = 16
TINY_OWL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def tiny_owl_config(model_type: str, vocab_size: int, image_size: int = TINY_OWL_IMAGE_SIZE):
    """A tiny ``Owlv2Config`` (``model_type="owlv2"``) or ``OwlViTConfig`` (``"owlvit"``) whose text tower
    reads ``vocab_size`` tokens (:func:`write_clip_tokenizer_dir`'s) of at most 16 per query."""
    from transformers import Owlv2Config, OwlViTConfig

    configs = {"owlv2": Owlv2Config, "owlvit": OwlViTConfig}
    if model_type not in configs:
        raise ValueError(f"model_type must be one of {list(configs)}, got {model_type!r}")
    config = configs[model_type](
        text_config={**TINY_OWL, "vocab_size": vocab_size, "max_position_embeddings": 16},
        vision_config={**TINY_OWL, "image_size": image_size, "patch_size": TINY_OWL_PATCH_SIZE},
        projection_dim=TINY_OWL["hidden_size"],
    )
    # transformers initialises every Linear with std 1.0 x this factor (not a constructor argument): at
    # 1.0 the random heads saturate (objectness 1.0 everywhere, degenerate boxes); 0.2 spreads the
    # scores over ~0.05..0.9.
    config.initializer_factor = 0.2
    return config


def write_clip_tokenizer_dir(directory: str | Path, *, words: list[str] | None = None) -> Path:
    """Write a byte-level BPE CLIP tokenizer (vocab.json, merges.txt) that ``from_pretrained`` can load.

    The vocabulary is every byte symbol alone and word-final, plus whole-word merges for
    :data:`PROMPT_WORDS` and ``words`` (ASCII words), so ANY text tokenizes (unknown words as single characters).
    Ids follow the real CLIP layout that OWL relies on: the pad token "!" is id 0 and
    <|startoftext|>, <|endoftext|> are the two highest ids (the text tower pools at the argmax id).
    """
    import json

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())  # "!" first
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    merges = []
    extra = [
        word for phrase in words or [] for word in phrase.lower().split() if word.isascii() and word.isalnum()
    ]
    for word in dict.fromkeys(PROMPT_WORDS + extra):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "p l", "pl a", ... "plan t</w>"
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = [*dict.fromkeys(vocab), "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!")
    tokenizer.save_pretrained(directory)
    return directory


# SAM 3 (sam3; the worker-sam3 environment, transformers >= 5): the real transformers Sam3Model with width-32
# towers (ViT 2 layers, CLIP text 1 layer, DETR 1+1 layers, 20 queries) at the released patch size (14):
# 112 px inputs = 8 x 8 patches, masks at 32 x 32 (4x the patch grid, as 288 for the released 1008 px).
TINY_SAM3_IMAGE_SIZE = 112
TINY_SAM3_QUERIES = 20


def tiny_sam3_config(vocab_size: int, image_size: int = TINY_SAM3_IMAGE_SIZE):
    """A tiny ``Sam3Config`` whose text tower reads ``vocab_size`` tokens (:func:`sam3_tokenizer`'s)."""
    from transformers import CLIPTextConfig, Sam3Config, Sam3VisionConfig, Sam3ViTConfig

    from pseudolabel.models.sam3 import TEXT_LENGTH

    # 10x the released init scale: at 0.02 every random query gives the same box and score 0.25; 0.2
    # spreads boxes and scores (~0.1..0.6), so smoke runs sort and cut real lists. Says nothing about quality.
    init = {"initializer_range": 0.2}
    width = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, **init}
    grid = image_size // 14
    vit = Sam3ViTConfig(
        **width,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=14,
        window_size=grid // 2,
        global_attn_indexes=[1],
        pretrain_image_size=image_size,
    )
    return Sam3Config(
        vision_config=Sam3VisionConfig(
            backbone_config=vit,
            fpn_hidden_size=32,
            backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
            **init,
        ),
        text_config=CLIPTextConfig(
            **width,
            vocab_size=vocab_size,
            num_hidden_layers=1,
            projection_dim=32,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        geometry_encoder_config={**width, "num_layers": 1},
        detr_encoder_config={**width, "num_layers": 1},
        detr_decoder_config={**width, "num_layers": 1, "num_queries": TINY_SAM3_QUERIES},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2, **init},
        **init,
    )


def sam3_tokenizer(words: list[str] | None = None):
    """A byte-level BPE ``CLIPTokenizer`` built in memory for transformers >= 5 (whose CLIPTokenizer takes
    the vocabulary and merges themselves): every byte symbol alone and word-final, whole-word merges for
    :data:`PROMPT_WORDS` and ``words``, then <|startoftext|> and <|endoftext|> as the two highest ids (as in
    CLIP). ANY text tokenizes; unknown words as single characters."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    merges: list[tuple[str, str]] = []
    extra = [
        word for phrase in words or [] for word in phrase.lower().split() if word.isascii() and word.isalnum()
    ]
    for word in dict.fromkeys(PROMPT_WORDS + extra):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "p l", "pl a", ... "plan t</w>"
            merges.append((pieces[0], pieces[1]))
            vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = [*dict.fromkeys(vocab), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=list(dict.fromkeys(merges))
    )


# EdgeTAM (edgetam): the real transformers EdgeTamModel with its timm RepViT-M1 backbone (random init,
# nothing downloaded) at 1/4 width and one block per stage, and a width-32 neck, prompt encoder and mask
# decoder; 128 px inputs -> features at 32, 16 and 8 px, mask logits at 32 x 32 (256 for the released 1024).
TINY_EDGETAM_IMAGE_SIZE = 128
TINY_EDGETAM_CHANNELS = (12, 24, 48, 96)  # RepViT stage widths (released: 48, 96, 192, 384)


def tiny_edgetam_config(image_size: int = TINY_EDGETAM_IMAGE_SIZE):
    """A tiny ``EdgeTamConfig`` for ``image_size`` px inputs (a multiple of 32)."""
    from transformers import EdgeTamConfig, EdgeTamVisionConfig, TimmWrapperConfig

    backbone = TimmWrapperConfig(
        architecture="repvit_m1",
        model_args={
            "in_chans": 3,
            "features_only": True,
            "out_indices": [0, 1, 2, 3],
            "embed_dim": list(TINY_EDGETAM_CHANNELS),
            "depth": [1, 1, 1, 1],
        },
    )
    vision = EdgeTamVisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(TINY_EDGETAM_CHANNELS[::-1]),
        backbone_feature_sizes=[[image_size // stride] * 2 for stride in (4, 8, 16)],
        fpn_hidden_size=32,
    )
    return EdgeTamConfig(
        vision_config=vision,
        # 10x the released init scale: at 0.02 the random decoder's logits are ~1e-5 (every IoU 0.500, masks
        # decided by rounding); 0.2 gives logits of order 0.1..1 and IoUs of 0.3..0.8. Says nothing about quality.
        initializer_range=0.2,
        prompt_encoder_config={"hidden_size": 32, "image_size": image_size, "mask_input_channels": 8},
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 4,
            "iou_head_hidden_dim": 32,
        },
    )
