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
