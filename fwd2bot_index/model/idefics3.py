"""The Idefics3 family (Idefics3, SmolVLM) behind the backbone seam.

These models split a large image into tiles plus a global view; the number of tiles (so of visual
tokens) then depends on the image. Fwd2Bot turns splitting off (``do_image_splitting=False``): every
image becomes the one square global view at ``max_image_size``, so it gives the same
``image_seq_len`` tokens (``(image_size / patch)^2 / scale_factor^2``: 64 for SmolVLM-256M/500M, 169 for
Idefics3-8B) and the LLaVA path applies unchanged: 1-D positions, square-grid pooling, ``full``
storage. In the prompt the tokens sit between ``<fake_token_around_image><global-img>`` and
``<fake_token_around_image>``, as the family's processor writes a single unsplit image.

The language model is ``model.text_model`` (not ``language_model``), so LoRA targets it by that name;
the projector is the pixel-shuffle ``connector``. SmolVLM's combined processor needs torchvision (its
video processor), so the parts are loaded separately as for Qwen2-VL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .backbone import ChatParts, LlavaBackbone
from .parts import ProcessorParts, load_parts

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
MODEL_TYPES = {"idefics3": ARCHITECTURES[0], "smolvlm": ARCHITECTURES[1]}
PIL_CLASSES = {"idefics3": "Idefics3ImageProcessorPil", "smolvlm": "SmolVLMImageProcessorPil"}
LORA_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
IMAGE_OPEN = "<fake_token_around_image><global-img>"
IMAGE_CLOSE = "<fake_token_around_image>"

# SmolVLM-Instruct's template (used only when a folder ships none)
DEFAULT_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class TilePixels:
    """``pixel_values`` of this family: (B, 1, C, S, S) global views and their pixel mask."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


def load_processor_parts(ref: str, model_type: str, revision: str | None = None) -> ProcessorParts:
    """Image processor (splitting off), tokenizer and chat template of an Idefics3 / SmolVLM folder."""
    return load_parts(ref, revision, PIL_CLASSES[model_type], DEFAULT_CHAT_TEMPLATE, do_image_splitting=False)


class Idefics3Backbone(LlavaBackbone):
    """Adapter over ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``."""

    image_placeholder = "<image>"
    lora_targets = LORA_TARGETS

    def __init__(self, hf_model: Any, processor: Any, reference: str, revision: str | None = None):
        super().__init__(hf_model, processor, reference, revision)
        self.family = str(self.hf.config.model_type)  # idefics3 or smolvlm

    @property
    def num_image_tokens(self) -> int:
        vision = self.hf.config.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 // self.hf.config.scale_factor ** 2)

    @property
    def decoder(self) -> torch.nn.Module:
        return self.hf.model.text_model

    @property
    def projector(self) -> torch.nn.Module:
        return self.hf.model.connector

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.hf.model.vision_model

    def pixel_values(self, images: Sequence[Any]) -> TilePixels:
        out = self.processor.image_processor(images=[[image] for image in images], return_tensors="pt",
                                             do_image_splitting=False)
        mask = out.get("pixel_attention_mask")
        return TilePixels(out["pixel_values"].to(self.device, self.dtype), None if mask is None else mask.to(self.device))

    def visual_tokens(self, pixels: TilePixels) -> torch.Tensor:
        out = self.hf.get_image_features(pixel_values=pixels.pixel_values, pixel_attention_mask=pixels.pixel_attention_mask)
        return torch.stack(list(out.pooler_output))

    def chat(self, prompt: str) -> ChatParts:
        """The model's template, with the image's own markers around the slot (one unsplit image)."""
        parts = self.chat_with_image_item(prompt)
        if "<image>" not in prompt:
            return parts
        return ChatParts(before=parts.before + IMAGE_OPEN, after=IMAGE_CLOSE + parts.after)
