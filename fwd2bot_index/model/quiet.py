"""Loading a model that is already on this machine, quietly.

Why: ``Fwd2Bot.from_pretrained("demo")`` printed transformers' "Loading weights" bar and a FutureWarning
that peft's constructor triggers inside transformers (``is_gradient_checkpointing``): noise for someone
loading a 4 MB model from a folder, on every CLI command. Downloads from the hub keep their bars (a
progress bar is information there); only loads from a local folder go through ``quiet_loading``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' progress bars off and transformers / peft FutureWarnings ignored, for the block only
    (both restored after, also on an error)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
