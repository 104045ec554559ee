"""Text prompts in Grounding DINO's caption convention."""

from __future__ import annotations


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, ending in '.' (phrases are separated by ' . ')."""
    caption = " ".join(text.lower().split())
    if not caption.strip(" ."):
        raise ValueError(f"prompt has no words: {text!r}")
    return caption if caption.endswith(".") else caption + " ."


def split_caption(text: str) -> list[str]:
    """One caption per class: ``"plant . flower ."`` -> ``["plant .", "flower ."]``."""
    captions = [normalize_caption(part) for part in text.split(".") if part.strip()]
    if not captions:
        raise ValueError(f"prompt has no words: {text!r}")
    return captions


def captions_for(prompt: str, one_prompt_per_class: bool) -> list[str]:
    """The captions a detection run uses: the whole prompt, or one per class to merge afterwards."""
    return split_caption(prompt) if one_prompt_per_class else [normalize_caption(prompt)]


def phrases_of(caption: str) -> list[str]:
    """``"potted plant . flower ."`` -> ``["potted plant", "flower"]``."""
    return [part.strip() for part in caption.split(".") if part.strip()]
