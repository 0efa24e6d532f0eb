"""Checkpoint folders: save, load, and fingerprint a Fwd2Bot model.

Layout (ARCHITECTURE.md "Contracts"):
  fwd2bot_config.json        config (format version, base reference + revision + signature, K, dims, prompts)
  compressor.safetensors     summary tokens, heads, pass-2 projection, temperature
  adapters/pass1/ adapters/pass2/   peft's own adapter format
  base/                      the base model + processor, when the base was trained here (self-contained)

No pickles anywhere. The fingerprint hashes content (config + weight files), never a path, so a
reinstall or a moved folder keeps collections valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbone import ModelLoadError, load_backbone
from .config import Fwd2BotConfig
from .fwd2bot import PASS1, PASS2, Compressor, Fwd2Bot
from .files import (  # noqa: F401  (re-exported: these names were defined here)
    _CARD_FILES, COMPRESSOR_FILE, CONFIG_FILE, DEMO_NAME, base_folder, demo_model_path, folder_fingerprint,
    is_checkpoint, is_demo_name, is_local_base,
)
from .quiet import quiet_loading


class CheckpointMismatchError(ValueError):
    """A compressor checkpoint was loaded onto a base model it was not trained on."""


def resolve_model_name(name: str) -> str:
    """Map ``demo`` / ``demo-nested`` to the shipped folders; leave folders and hub ids alone."""
    if is_demo_name(name):
        path = demo_model_path(name)
        if not is_checkpoint(path):
            raise ModelLoadError(
                f"the {name} model is not installed at {path}; reinstall fwd2bot-index, or pass --model "
                "with a checkpoint folder or a LLaVA model"
            )
        return str(path)
    return name


# -- fingerprint -----------------------------------------------------------------------------
def model_fingerprint(model: Fwd2Bot) -> str:
    """The checkpoint folder's content hash, or for a stock model its signature plus folder hash."""
    source = Path(model.source) if model.source else None
    if source is not None and source.is_dir():
        return folder_fingerprint(source)
    digest = hashlib.sha256(json.dumps(model.config.base_signature, sort_keys=True).encode())
    digest.update(f"{model.config.base_model}@{model.config.base_revision}".encode())
    return digest.hexdigest()[:32]


# -- save ------------------------------------------------------------------------------------
def _versions() -> dict:
    import peft
    import transformers

    from .. import __version__

    return {"fwd2bot_index": __version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "torch": torch.__version__}


def _clean_base_state_dict(model: Fwd2Bot) -> dict:
    """Base weights without LoRA tensors and with peft's ``base_layer`` indirection removed."""
    hf = model.peft.get_base_model() if model.peft is not None else model.backbone.hf
    state = {}
    for key, value in hf.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer", "")] = value.detach().contiguous()
    return state


def relocated_base(base_model: str, source: str | os.PathLike[str] | None, dest: str | Path) -> str:
    """``base_model`` as a checkpoint written to ``dest`` must name it. A base relative to the checkpoint
    (``../demo_model/base``, read against ``source``, the folder the config came from) would point elsewhere
    from ``dest``, so it is rewritten relative to ``dest`` (``./`` or ``../`` kept, so it stays a local base),
    or made absolute where no relative path exists (another drive). ``base`` (saved inside), hub ids,
    absolute folders and a model with no source folder are left as they are."""
    if base_model == "base" or not is_local_base(base_model) or source is None:
        return base_model
    resolved = Path(base_folder(source, base_model))
    try:
        rel = Path(os.path.relpath(resolved, Path(dest).resolve())).as_posix()
    except ValueError:  # no relative path between them (Windows: another drive)
        return str(resolved)
    return rel if rel.startswith("../") else f"./{rel}"


def save_model(model: Fwd2Bot, path: str | Path, include_base: bool | None = None, base: str | None = None) -> None:
    """Write a checkpoint folder atomically (a temp folder renamed into place). A base named relative to
    the model's folder is renamed relative to ``path`` (``relocated_base``), so the copy loads wherever it is.
    ``base`` names the base instead, as given (a path relative to ``path``, a hub id or a folder): a copy
    that shares a base already beside its destination (the shipped ``demo-nested``)."""
    if model.compressor is None:
        raise ValueError("a stock model has no compressor to save; it is used directly from its folder")
    if base is not None and include_base:
        raise ValueError("a checkpoint either holds its base or names one: give include_base or base, not both")
    path = Path(path)
    if include_base is None:  # a self-contained model stays so, unless the caller names a base to share
        include_base = model.config.base_model == "base" and base is None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = model.config
        config.versions = _versions()
        config.image_options = model.image_options
        if include_base:
            config.base_model, config.base_revision = "base", None
            hf = model.peft.get_base_model() if model.peft is not None else model.backbone.hf
            hf.save_pretrained(tmp / "base", state_dict=_clean_base_state_dict(model))
            model.backbone.processor.save_pretrained(tmp / "base")
        elif base is not None:
            config.base_model, config.base_revision = base, None
        else:
            config.base_model = relocated_base(config.base_model, model.source, path)
        (tmp / CONFIG_FILE).write_text(config.to_json())
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.compressor.state_dict().items()}
        save_file(tensors, str(tmp / COMPRESSOR_FILE), metadata={"format": "fwd2bot-compressor"})
        model.peft.save_pretrained(str(tmp / "adapters"), selected_adapters=[PASS1, PASS2])
        for card in (tmp / "adapters").rglob("README.md"):  # peft's generic card says nothing of ours
            card.unlink()
        card = path / "README.md"
        if card.is_file():
            shutil.copy2(card, tmp / "README.md")
        backup = None
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.source = str(path)
    model._fingerprint = None


# -- load ------------------------------------------------------------------------------------
def _check_signature(expected: dict, actual: dict, base_ref: str) -> None:
    exact = ("family", "hidden_size", "num_layers", "vocab_size", "num_image_tokens")
    differs = [k for k in exact if k in expected and expected[k] != actual.get(k)]
    probe_a, probe_b = expected.get("embedding_probe", []), actual.get("embedding_probe", [])
    if not differs and probe_a and len(probe_a) == len(probe_b):
        a, b = torch.tensor(probe_a), torch.tensor(probe_b)
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-2):
            differs.append("weights")
    if differs:
        raise CheckpointMismatchError(
            f"this compressor checkpoint was trained on another base model than {base_ref} "
            f"(different {', '.join(differs)}); load it with the base it was trained on "
            f"(its fwd2bot_config.json names it), or retrain with `f2b train`"
        )


def load_checkpoint(path: str | Path, device: str | None = "auto", dtype: str | None = "auto",
                    base: str | None = None, revision: str | None = None, **image_options: int | None) -> Fwd2Bot:
    """Load a Fwd2Bot checkpoint folder onto its base (or onto ``base``, checked for a match).

    ``image_options`` (``min_pixels``, ``max_pixels``) go to the base's image processor; each one not
    given is the value recorded at training (``fwd2bot_config.json``), else the base folder's own.
    """
    from peft import PeftModel

    path = Path(path)
    config = Fwd2BotConfig.read(path)
    if base is not None:
        base_ref, base_rev = base, revision
    elif is_local_base(config.base_model):
        base_ref, base_rev = base_folder(path, config.base_model), None
        if not Path(base_ref).is_dir():  # else load_backbone would take the path for a hub id and say so
            raise ModelLoadError(
                f"the base model folder {base_ref} does not exist: {path / CONFIG_FILE} names it as "
                f"{config.base_model!r} (relative to the checkpoint); put the base there (a checkpoint sharing "
                "another's base must stay beside it), or pass its folder as from_pretrained(..., base=FOLDER)"
            )
    else:
        base_ref, base_rev = config.base_model, config.base_revision
    trained_with = {k: v if v is not None else config.image_options.get(k) for k, v in image_options.items()}
    backbone = load_backbone(base_ref, device=device, dtype=dtype, revision=base_rev, **trained_with)
    _check_signature(config.base_signature, backbone.signature(), base_ref)
    compressor = Compressor(config.hidden_size, config.num_summary_tokens, config.embed_dim,
                            image_readout=config.image_readout, text_readout=config.text_readout)
    compressor.load_state_dict(load_file(str(path / COMPRESSOR_FILE)))
    compressor.to(backbone.device, backbone.dtype)
    peft_model = PeftModel.from_pretrained(backbone.hf, str(path / "adapters" / PASS1), adapter_name=PASS1)
    peft_model.load_adapter(str(path / "adapters" / PASS2), adapter_name=PASS2)
    peft_model.eval()
    return Fwd2Bot(backbone, config, compressor, peft_model, source=str(path))


def load_model(name_or_path: str, device: str | None = "auto", dtype: str | None = "auto",
               base: str | None = None, revision: str | None = None, min_pixels: int | None = None,
               max_pixels: int | None = None) -> Fwd2Bot:
    """``demo`` | checkpoint folder | stock LLaVA / Qwen2-VL folder or hub id -> a ready Fwd2Bot.

    ``min_pixels`` / ``max_pixels``: resize bounds of a dynamic-resolution family (Qwen2-VL).
    """
    resolved = resolve_model_name(str(name_or_path))
    if Path(resolved).is_dir():  # the demo model or a folder here: no bars, no library deprecation notices
        with quiet_loading():
            return _load_resolved(resolved, device, dtype, base, revision, min_pixels, max_pixels)
    return _load_resolved(resolved, device, dtype, base, revision, min_pixels, max_pixels)


def _load_resolved(resolved: str, device: str | None, dtype: str | None, base: str | None, revision: str | None,
                   min_pixels: int | None, max_pixels: int | None) -> Fwd2Bot:
    image_options = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if is_checkpoint(resolved):
        return load_checkpoint(resolved, device=device, dtype=dtype, base=base, revision=revision, **image_options)
    if base is not None:
        raise ValueError(f"--base only applies to a Fwd2Bot checkpoint; {resolved} is a stock model")
    if Path(resolved).exists() and not (Path(resolved) / "config.json").is_file():
        raise ModelLoadError(
            f"{resolved} is neither a Fwd2Bot checkpoint (no {CONFIG_FILE}) nor a transformers model "
            "folder (no config.json)"
        )
    backbone = load_backbone(resolved, device=device, dtype=dtype, revision=revision, **image_options)
    return Fwd2Bot.stock(backbone)
