"""A lean text encoder for small self-contained checkpoints (the demo model): numpy, no torch.

Why: a cold ``f2b search`` spent ~5 s importing torch, transformers and peft to embed one query with a
4 MB model whose forward pass takes 10 ms (measured on the 2-core machine: imports 3.4 s, load 0.3 s,
query 0.01 s). For a checkpoint whose base is stored with it (``base/``), small enough for numpy, and of
the one architecture written out here (a LLaVA whose language model is Llama with default rotary
positions, no chat template, LoRA adapters without DoRA), the query embedding is computed here from the
same files, in float32, exactly as ``Fwd2Bot.encode_texts`` computes it (tests compare the two). Anything
else returns None from ``LeanTextEncoder.load`` and the caller loads the real model.

The steps mirror ``Fwd2Bot.text_states`` and ``embed_text_batch``: the text inside the checkpoint's
text prompt, in the LLaVA-1.5 chat convention the backbone uses without a template; BOS, then the
tokenizer's ids without its own specials; the language model with the pass-1 LoRA adapter; the
final-norm state of the last token (or, for ``text_readout: mixer``, every token's state through the
token mixer's pre-norm transformer layers, then their mean); the text head; L2 normalisation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import MIXER_HEADS, TEXT_READOUTS
from .files import (
    COMPRESSOR_FILE, CONFIG_FILE, base_folder, demo_model_path, folder_fingerprint, is_demo_name, is_local_base,
)

#: above this many language-model parameters the real model (torch, threads, maybe a GPU) is the better
#: choice even for one query
MAX_PARAMETERS = 50_000_000
_LAYER = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.")


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | float = 0.0) -> np.ndarray:
    """(heads, n, d) queries, keys, values -> (heads, n, d), scaled dot-product."""
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + bias
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + eps) * weight + bias


def mix_tokens(states: np.ndarray, w: dict[str, np.ndarray], heads: int = MIXER_HEADS) -> np.ndarray:
    """``readout.TokenMixer`` in numpy for one unpadded text: (n, H) states -> (W,), with ``w`` its state dict
    (``project.*`` when it projects, then ``layers.layers.{i}.*`` of torch's pre-norm encoder layers, ReLU)."""
    x = states @ w["project.weight"].T + w["project.bias"] if "project.weight" in w else states
    n, width = x.shape
    i = 0
    while f"layers.layers.{i}.norm1.weight" in w:
        p = f"layers.layers.{i}."
        y = _layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
        q, k, v = np.split(y @ w[p + "self_attn.in_proj_weight"].T + w[p + "self_attn.in_proj_bias"], 3, axis=-1)
        q, k, v = (t.reshape(n, heads, width // heads).transpose(1, 0, 2) for t in (q, k, v))
        attn = _softmax_attention(q, k, v).transpose(1, 0, 2).reshape(n, width)
        x = x + attn @ w[p + "self_attn.out_proj.weight"].T + w[p + "self_attn.out_proj.bias"]
        y = _layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
        hidden = np.maximum(y @ w[p + "linear1.weight"].T + w[p + "linear1.bias"], 0.0)
        x = x + hidden @ w[p + "linear2.weight"].T + w[p + "linear2.bias"]
        i += 1
    return x.mean(axis=0)


class LeanTextEncoder:
    """Query embeddings of a small LLaVA-Llama Fwd2Bot checkpoint, computed with numpy."""

    def __init__(self, folder: Path, config: dict[str, Any], text: dict[str, Any], weights: dict[str, np.ndarray],
                 lora: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, head: tuple[np.ndarray, np.ndarray],
                 tokenizer: Any, bos_id: int | None, mixer: dict[str, np.ndarray] | None = None):
        self.folder, self.config, self.text = folder, config, text
        self.mixer = mixer  # the text readout's weights (``text_readout: mixer``), else None: the last state
        self.w, self.lora, self.scale, self.head = weights, lora, scale, head
        self.tokenizer, self.bos_id = tokenizer, bos_id
        self.heads = int(text["num_attention_heads"])
        self.kv_heads = int(text.get("num_key_value_heads") or self.heads)
        self.head_dim = int(text.get("head_dim") or text["hidden_size"] // self.heads)
        self.eps = float(text.get("rms_norm_eps", 1e-6))
        self.theta = float((text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0)))
        self.layers = int(text["num_hidden_layers"])
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name: str) -> "LeanTextEncoder | None":
        """The encoder for ``name`` (``demo`` or a checkpoint folder), or None when this path does not
        cover it (then load the real model). ``F2B_LEAN=0`` turns it off."""
        if os.environ.get("F2B_LEAN", "1") == "0":
            return None
        folder = demo_model_path(name) if is_demo_name(name) else Path(name)
        try:
            return cls._load(folder)
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            return None  # unreadable or unexpected: the real loader will say what is wrong

    @classmethod
    def _load(cls, folder: Path) -> "LeanTextEncoder | None":
        if not (folder / CONFIG_FILE).is_file():
            return None
        config = json.loads((folder / CONFIG_FILE).read_text())
        base_model = str(config.get("base_model"))
        if not is_local_base(base_model):
            return None  # a base elsewhere (a hub id): the real loader resolves it
        base = Path(base_folder(folder, base_model))
        if not (base / "config.json").is_file():
            return None
        base_config = json.loads((base / "config.json").read_text())
        text = base_config.get("text_config") or {}
        lora_cfg = json.loads((folder / "adapters" / "pass1" / "adapter_config.json").read_text())
        tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
        rope = text.get("rope_parameters") or {"rope_type": "default"}
        supported = (
            config.get("base_family") == "llava" and config.get("text_readout", "last") in TEXT_READOUTS
            and base_config.get("model_type") == "llava" and text.get("model_type") == "llama"
            and rope.get("rope_type", "default") == "default" and not text.get("attention_bias")
            and not text.get("mlp_bias") and text.get("hidden_act", "silu") == "silu"
            and int(text.get("pretraining_tp", 1)) == 1
            and not tok_cfg.get("chat_template") and not (base / "chat_template.jinja").exists()
            and not (base / "chat_template.json").exists()
            and lora_cfg.get("peft_type") == "LORA" and not lora_cfg.get("use_dora")
            and not lora_cfg.get("use_rslora") and lora_cfg.get("bias", "none") == "none"
            and not lora_cfg.get("rank_pattern") and not lora_cfg.get("alpha_pattern")
            and not lora_cfg.get("fan_in_fan_out") and (base / "tokenizer.json").is_file()
        )
        if not supported:
            return None
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        raw = load_file(str(base / "model.safetensors"))
        prefix = next((p for p in ("language_model.model.", "model.language_model.") if f"{p}norm.weight" in raw), None)
        if prefix is None:
            return None
        weights = {k[len(prefix):]: v.astype(np.float32) for k, v in raw.items() if k.startswith(prefix)}
        if sum(v.size for v in weights.values()) > MAX_PARAMETERS:
            return None
        lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        pattern = re.compile(lora_cfg["target_modules"]) if isinstance(lora_cfg.get("target_modules"), str) else None
        adapter = load_file(str(folder / "adapters" / "pass1" / "adapter_model.safetensors"))
        for key, value in adapter.items():
            found = _LAYER.search(key)
            if found is None or ".lora_A." not in key:
                continue
            module = key[: key.index(".lora_A.")]
            if pattern is not None and not pattern.fullmatch(module.removeprefix("base_model.model.")):
                continue
            b_key = key.replace(".lora_A.", ".lora_B.")
            lora[f"layers.{found.group(1)}.{found.group(2)}.{found.group(3)}"] = (
                value.astype(np.float32), adapter[b_key].astype(np.float32))
        if not lora:
            return None
        head = load_file(str(folder / COMPRESSOR_FILE))
        mixer = {k[len("text_mixer."):]: v.astype(np.float32) for k, v in head.items() if k.startswith("text_mixer.")}
        if (config.get("text_readout") == "mixer") != bool(mixer):
            return None
        tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        bos = tok_cfg.get("bos_token")
        bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
        scale = float(lora_cfg["lora_alpha"]) / float(lora_cfg["r"])
        return cls(folder, config, text, weights, lora, scale,
                   (head["text_head.weight"].astype(np.float32), head["text_head.bias"].astype(np.float32)),
                   tokenizer, bos_id, mixer or None)

    @property
    def fingerprint(self) -> str:
        """The checkpoint folder's content hash (the one a collection records)."""
        if self._fingerprint is None:
            self._fingerprint = folder_fingerprint(self.folder)
        return self._fingerprint

    # ------------------------------------------------------------------ encoding
    def token_ids(self, text: str) -> list[int]:
        """As ``Fwd2Bot.text_states``: the prompt in the no-template chat convention, BOS + ids."""
        prompt = self.config["text_embed_prompt"].format(text=text)
        before, _, after = f"USER: {prompt} ASSISTANT:".partition("<image>")  # as LlavaBackbone.chat splits it
        ids = self.tokenizer.encode(before + after, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, D) float32 L2-normalized embeddings, one text at a time (no padding)."""
        out = []
        for text in texts:
            states = self._states(self.token_ids(text))
            state = states[-1] if self.mixer is None else mix_tokens(states, self.mixer)
            weight, bias = self.head
            vec = state @ weight.T + bias
            out.append(vec / max(float(np.linalg.norm(vec)), 1e-12))
        return np.stack(out).astype(np.float32) if out else np.zeros((0, self.head[0].shape[0]), np.float32)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T
        adapter = self.lora.get(name)
        if adapter is not None:
            a, b = adapter
            y = y + ((x @ a.T) @ b.T) * self.scale
        return y

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        variance = np.mean(x * x, axis=-1, keepdims=True)
        return self.w[name] * (x / np.sqrt(variance + self.eps))

    def _states(self, ids: list[int]) -> np.ndarray:
        """(n, H) final-norm states of every token."""
        h = self.w["embed_tokens.weight"][np.asarray(ids)]
        n, hd = len(ids), self.head_dim
        inv_freq = 1.0 / (self.theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
        freqs = np.outer(np.arange(n, dtype=np.float32), inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[None], np.sin(emb)[None]

        def rotate(x: np.ndarray) -> np.ndarray:
            half = x.shape[-1] // 2
            return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

        causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
        for i in range(self.layers):
            p = f"layers.{i}"
            x = self._norm(h, f"{p}.input_layernorm.weight")
            q = self._linear(x, f"{p}.self_attn.q_proj").reshape(n, self.heads, hd).transpose(1, 0, 2)
            k = self._linear(x, f"{p}.self_attn.k_proj").reshape(n, self.kv_heads, hd).transpose(1, 0, 2)
            v = self._linear(x, f"{p}.self_attn.v_proj").reshape(n, self.kv_heads, hd).transpose(1, 0, 2)
            q, k = rotate(q), rotate(k)
            if self.kv_heads != self.heads:
                k = np.repeat(k, self.heads // self.kv_heads, axis=0)
                v = np.repeat(v, self.heads // self.kv_heads, axis=0)
            attn = _softmax_attention(q, k, v, causal)
            h = h + self._linear(attn.transpose(1, 0, 2).reshape(n, self.heads * hd), f"{p}.self_attn.o_proj")
            x = self._norm(h, f"{p}.post_attention_layernorm.weight")
            gated = _silu(self._linear(x, f"{p}.mlp.gate_proj")) * self._linear(x, f"{p}.mlp.up_proj")
            h = h + self._linear(gated, f"{p}.mlp.down_proj")
        return self._norm(h, "norm.weight")
