"""The model core: LLaVA backbones, the Fwd2Bot compressor, pooling, checkpoints, tiny builders.

Knows nothing of storage. Public entry points: ``Fwd2Bot`` (``from_pretrained``, ``encode_images``,
``encode_texts``, ``answer``, ``save_pretrained``), ``Strategy`` and ``load_model``.

Names are imported on first use (PEP 562): ``from fwd2bot_index.model.config import Strategy`` and
``f2b info`` then do not pay seconds for torch, transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LlavaBackbone": "backbone", "ModelLoadError": "backbone", "UnsupportedModelError": "backbone",
    "load_backbone": "backbone", "supported_architectures": "backbone",
    "CheckpointMismatchError": "checkpoint", "demo_model_path": "checkpoint", "folder_fingerprint": "checkpoint",
    "is_checkpoint": "checkpoint", "load_model": "checkpoint",
    "Fwd2BotConfig": "config", "Strategy": "config", "StrategyError": "config",
    "Fwd2Bot": "fwd2bot", "ImageEncoding": "fwd2bot", "UntrainedCompressorError": "fwd2bot",
    "pool_by_stride": "pooling", "pool_visual_tokens": "pooling",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
