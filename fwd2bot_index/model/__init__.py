"""The model core: LLaVA backbones, the Fwd2Bot compressor, pooling, checkpoints, tiny builders.

Knows nothing of storage. Public entry points: ``Fwd2Bot`` (``from_pretrained``, ``encode_images``,
``encode_texts``, ``answer``, ``save_pretrained``), ``Strategy`` and ``load_model``.
"""

from .backbone import (
    LlavaBackbone,
    ModelLoadError,
    UnsupportedModelError,
    load_backbone,
    supported_architectures,
)
from .checkpoint import (
    CheckpointMismatchError,
    demo_model_path,
    folder_fingerprint,
    is_checkpoint,
    load_model,
)
from .config import Fwd2BotConfig, Strategy, StrategyError
from .fwd2bot import Fwd2Bot, ImageEncoding, UntrainedCompressorError
from .pooling import pool_by_stride, pool_visual_tokens

__all__ = [
    "CheckpointMismatchError", "Fwd2Bot", "Fwd2BotConfig", "ImageEncoding", "LlavaBackbone",
    "ModelLoadError", "Strategy", "StrategyError", "UnsupportedModelError", "UntrainedCompressorError",
    "demo_model_path", "folder_fingerprint", "is_checkpoint", "load_backbone", "load_model",
    "pool_by_stride", "pool_visual_tokens", "supported_architectures",
]
