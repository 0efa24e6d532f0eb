"""A processor loaded as its parts: image processor, tokenizer and chat template.

transformers 5 cannot build the combined processors of some families (Qwen2-VL, SmolVLM) without
torchvision, because their video processors need it; there is no CPU torchvision build on these
machines. The parts are all Fwd2Bot needs, so they are loaded one by one, the same way for a local
folder and a hub id, with or without torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .backbone import ModelLoadError


class ProcessorParts:
    """Image processor + tokenizer + chat template, standing in for the family's combined processor.

    Saved as a hub folder keeps them: ``preprocessor_config.json``, the tokenizer files and
    ``chat_template.jinja``.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(self.chat_template)


def _folder_file(ref: str, name: str, revision: str | None) -> Path | None:
    from transformers.utils import cached_file

    try:
        found = cached_file(ref, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def read_chat_template(ref: str, revision: str | None, tokenizer: Any) -> str | None:
    """The folder's chat template: ``chat_template.json`` (older hub layout), ``chat_template.jinja``,
    else the tokenizer's own (``None`` when there is none)."""
    found = _folder_file(ref, "chat_template.json", revision)
    if found is not None:
        template = json.loads(found.read_text()).get("chat_template")
        if template:
            return template
    found = _folder_file(ref, "chat_template.jinja", revision)
    if found is not None:
        return found.read_text()
    return getattr(tokenizer, "chat_template", None)


def load_parts(ref: str, revision: str | None, pil_class: str, default_template: str,
               **image_kwargs: Any) -> ProcessorParts:
    """Load the parts; the image processor is the family's Pil class (``pil_class``) when torchvision is
    missing, else whatever the folder's ``preprocessor_config.json`` names."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    try:
        if is_torchvision_available():
            image_processor = AutoImageProcessor.from_pretrained(ref, revision=revision, **image_kwargs)
        else:
            image_processor = getattr(transformers, pil_class).from_pretrained(ref, revision=revision, **image_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision, padding_side="left")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the image processor or tokenizer of {ref!r}: {exc}") from exc
    template = read_chat_template(ref, revision, tokenizer) or default_template
    return ProcessorParts(image_processor, tokenizer, template)
