"""Published reference numbers (percent), for comparison tables only, always labelled as published.

Source: the project's design notes (ARCHITECTURE.md, "Reference numbers"), which cite these papers:

* CLIP: Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision".
* E5-V: Jiang et al., 2024, "E5-V: Universal Embeddings with Multimodal Large Language Models".
* SugarCrepe: Hsieh et al., 2023, "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language
  Compositionality" (its evaluation of OpenAI CLIP ViT-L/14).
"""

from __future__ import annotations

PAPERS: dict[str, str] = {
    "CLIP": 'Radford et al., 2021. "Learning Transferable Visual Models From Natural Language Supervision"',
    "E5-V": 'Jiang et al., 2024. "E5-V: Universal Embeddings with Multimodal Large Language Models"',
    "SugarCrepe": 'Hsieh et al., 2023. "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language Compositionality"',
}

# Zero-shot R@1 on the Karpathy test splits (Flickr30k 1k images, COCO 5k images, 5 captions each).
PUBLISHED_RETRIEVAL_R1: dict[str, dict[str, dict[str, float]]] = {
    "flickr30k": {
        "CLIP ViT-L/14": {"t2i": 67.3, "i2t": 87.2},
        "E5-V (8B)": {"t2i": 79.5, "i2t": 88.2},
    },
    "coco": {
        "CLIP ViT-L/14": {"t2i": 37.0, "i2t": 58.1},
        "E5-V (8B)": {"t2i": 52.0, "i2t": 62.0},
    },
}
RETRIEVAL_PAPER = {"CLIP ViT-L/14": "CLIP", "E5-V (8B)": "E5-V"}
# Karpathy test split sizes the published numbers were measured on.
PUBLISHED_TEST_IMAGES = {"flickr30k": 1000, "coco": 5000}

# OpenAI CLIP ViT-L/14 accuracy per SugarCrepe category, as reported in the SugarCrepe paper.
PUBLISHED_SUGARCREPE_CLIP_L14: dict[str, float] = {
    "replace_obj": 94.1,
    "replace_att": 79.2,
    "replace_rel": 65.2,
    "swap_obj": 60.2,
    "swap_att": 62.3,
    "add_obj": 78.3,
    "add_att": 71.5,
}


def retrieval_reference_key(dataset_name: str) -> str | None:
    """Map a dataset name (``flickr30k``, ``coco``, ``dataset_coco``...) to its published-table key."""
    lowered = dataset_name.lower()
    if "flickr30" in lowered or "f30k" in lowered:
        return "flickr30k"
    if "coco" in lowered:
        return "coco"
    return None
