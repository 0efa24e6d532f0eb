"""Checks for the options a user types (device, dtype, backend, ...), run before anything heavy loads.

Why here and not in the shells: the CLI and the REST app both need the same answers, and a bad
``--backend`` must be refused in a second, not after a model has loaded for half a minute. No torch
at import time; only a CUDA device request asks torch whether CUDA is there (the model is about to
load anyway).
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = [
    "BACKENDS", "DEVICE_HELP", "DTYPES", "FAISS_KINDS", "OptionError", "TOKEN_DTYPES", "check_choice",
    "check_device", "check_model_reference", "check_options", "check_strategy",
]

# the manifest's BACKENDS, repeated here so this module imports nothing of collection/ (kept in sync by a test)
BACKENDS = ("faiss", "qdrant-edge", "qdrant-local", "qdrant-server")
DTYPES = ("auto", "fp32", "bf16", "fp16")
TOKEN_DTYPES = ("fp16", "int8")
FAISS_KINDS = ("auto", "flat", "hnsw", "ivfpq")
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class OptionError(ValueError):
    """An option value the program does not know; the message names the option, the value and the choices."""


def check_choice(option: str, value: str | None, choices: Iterable[str], aliases: Iterable[str] = ()) -> None:
    """Refuse ``value`` unless it is one of ``choices`` or ``aliases`` (None means "not given" and passes)."""
    choices = tuple(choices)
    if value is not None and value not in choices and value not in tuple(aliases):
        raise OptionError(f"{option} {value!r} is not known: use one of {', '.join(choices)}")


def check_device(device: str | None) -> None:
    """A device string torch understands, and CUDA only where CUDA is present."""
    if device is None:
        return
    if not _DEVICE.match(device):
        raise OptionError(f"--device {device!r} is not known: use {DEVICE_HELP}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: this machine has no CUDA device (or torch is a CPU build); "
                              "use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise OptionError("--device mps: Apple's MPS is not available here; use --device cpu or auto")


def check_strategy(strategy: str | None) -> None:
    """A strategy that parses (whether the model can serve it is checked when the model loads)."""
    if strategy is None:
        return
    from .model.config import Strategy, StrategyError  # torch-free module

    try:
        Strategy.parse(strategy)
    except StrategyError as exc:
        raise OptionError(f"--strategy: {exc}") from None


def check_options(device: str | None = None, dtype: str | None = None, backend: str | None = None,
                  token_dtype: str | None = None, faiss_index: str | None = None,
                  strategy: str | None = None) -> None:
    """Check every given option; the first bad one raises ``OptionError``."""
    check_choice("--dtype", dtype, DTYPES, aliases=("float32", "bfloat16", "float16"))
    check_choice("--backend", backend, BACKENDS)
    check_choice("--token-dtype", token_dtype, TOKEN_DTYPES)
    check_choice("--faiss-index", faiss_index, FAISS_KINDS)
    check_strategy(strategy)
    check_device(device)


def check_model_reference(name: str | None, probe_timeout: float = 2.0) -> None:
    """Fail in seconds, with the way out, on a hub id this machine cannot fetch.

    ``demo`` and existing folders pass. A hub id passes when the Hugging Face cache holds it; otherwise
    with ``HF_HUB_OFFLINE`` set it is refused at once, and without it one short TCP probe of the hub
    decides (transformers would otherwise retry for ~25 s before saying the same thing). A cached id
    on a machine that cannot reach the hub switches this process to offline mode: transformers then
    reads the cache at once instead of retrying every file (measured: 7.5 minutes for `f2b index`).
    """
    import os
    from pathlib import Path

    from .model.files import is_demo_name

    if name is None or is_demo_name(name) or Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise OptionError(f"--model {name}: no such folder (give demo, a checkpoint folder, a LLaVA folder or a "
                          "hub id such as llava-hf/llava-1.5-7b-hf)")
    try:
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise OptionError(f"--model {name!r} is neither a folder here nor a valid hub id (like "
                          "llava-hf/llava-1.5-7b-hf)") from None
    if isinstance(cached, str):
        if not constants.HF_HUB_OFFLINE and not _reachable(constants.ENDPOINT, probe_timeout):
            _read_cache_only(constants)
        return
    way_out = ("download it on a machine with network (`hf download ID --local-dir DIR`) and pass the folder, "
               "or use --model demo")
    if constants.HF_HUB_OFFLINE:
        raise OptionError(f"--model {name}: not a folder here and not in the Hugging Face cache, and HF_HUB_OFFLINE "
                          f"is set; {way_out}")
    if not _reachable(constants.ENDPOINT, probe_timeout):
        raise OptionError(f"--model {name}: not a folder here, not in the Hugging Face cache, and "
                          f"{constants.ENDPOINT} cannot be reached from this machine; {way_out}")


def _read_cache_only(constants) -> None:
    """Offline mode for this process and its children (huggingface_hub reads the flag at call time)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _reachable(url: str, timeout: float) -> bool:
    """One TCP connect to the URL's host (no HTTP, no retries)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
