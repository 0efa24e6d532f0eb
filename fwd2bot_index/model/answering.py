"""Pass 2's answering loop: greedy decoding from stored tokens without ``generate()``'s per-call costs.

Why not ``model.generate``: an answer from K stored tokens prefills only ~50 positions, so the fixed
costs around the model calls (generation config and logits-processor set-up, cache and mask
preparation, stopping criteria, a streamer thread) and the LoRA side-branches weigh far more than
they do after 576 visual tokens. This loop keeps only what greedy decoding needs:

- the chat text *before* the stored tokens is the same for every question, so its key/value cache is
  computed once per (adapter, weights) and copied into each answer (``Answerer._prefix_kv``);
- the pass-2 LoRA adapter can be merged into a second copy of the LLM's adapted linear layers
  (``merged_decoder``: embeddings, norms and every other weight stay shared), where memory allows;
- the prefill and every decoding step call the decoder and the LM head directly on a ``DynamicCache``.

The result is the same greedy answer as ``generate(do_sample=False)`` with the same positions (tested);
a checkpoint whose generation config asks for logits processors this loop does not apply (e.g.
``no_repeat_ngram_size``) is answered by ``generate`` instead (``lean_supported``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import PASS2

#: generation-config fields that would change a greedy answer and that the lean loop does not apply
_UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id",
                "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                "exponential_decay_length_penalty", "guidance_scale")

#: ``F2B_ANSWER_MERGE``: ``auto`` (default: merge when memory allows), ``on``, ``off``
MERGE_ENV = "F2B_ANSWER_MERGE"


def lean_supported(generation_config: Any) -> bool:
    """Whether greedy decoding under ``generation_config`` is plain argmax (plus a repetition penalty)."""
    if generation_config is None:
        return True
    for name in _UNSUPPORTED:
        value = getattr(generation_config, name, None)
        idle = (None, 1) if name == "guidance_scale" else (None, 0)  # 1: no guidance; 0: no minimum / n-gram
        if value not in idle and value != [] and value != {}:
            return False
    return True


def repetition_penalty(generation_config: Any) -> float | None:
    value = getattr(generation_config, "repetition_penalty", None)
    return None if value in (None, 1.0) else float(value)


def weights_version(params: Sequence[torch.Tensor]) -> int:
    """A counter that changes whenever any of ``params`` is modified in place (an optimizer step,
    ``load_state_dict``): caches derived from the weights are rebuilt when it moves."""
    return sum(p._version for p in params)


# ------------------------------------------------------------------------------------ layout


def prefix_first(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None,
                 prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each left-padded row's first ``prefix`` real positions to the front: ``[prefix][pad][rest]``.

    The same tokens with the same position ids, so attention sees exactly what it saw before, but the
    shared prefix now sits in the same columns of every row and its cached keys/values serve them all.
    Returns (embeds, mask, positions) with explicit positions ((B, L), or (3, B, L) for M-RoPE).
    """
    batch, length = mask.shape
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    order = []
    for row in range(batch):
        start = length - int(mask[row].sum())
        cols = list(range(start, start + prefix)) + list(range(start)) + list(range(start + prefix, length))
        order.append(cols)
    index = torch.tensor(order, device=mask.device)
    embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    mask = mask.gather(1, index)
    if positions.ndim == 3:
        positions = positions.gather(2, index.unsqueeze(0).expand(positions.shape[0], -1, -1))
    else:
        positions = positions.gather(1, index)
    return embeds, mask, positions


# ------------------------------------------------------------------------------ merged LoRA


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def merged_bytes(decoder: nn.Module) -> int:
    """Bytes a merged copy of ``decoder``'s adapted linear layers takes."""
    total = 0
    for _, layer in _lora_layers(decoder):
        weight = layer.get_base_layer().weight
        total += weight.numel() * weight.element_size()
    return total


def should_merge(decoder: nn.Module, device: torch.device) -> bool:
    """``F2B_ANSWER_MERGE`` (on/off), else merge when the copy takes under a quarter of the free memory."""
    choice = os.environ.get(MERGE_ENV, "auto").strip().lower()
    if choice in ("on", "1", "true", "yes"):
        return True
    if choice in ("off", "0", "false", "no"):
        return False
    need = merged_bytes(decoder)
    if need == 0:
        return False
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return False
    return need * 4 <= free


def merged_decoder(decoder: nn.Module, adapter: str) -> nn.Module | None:
    """A copy of ``decoder`` with ``adapter``'s LoRA folded into plain ``nn.Linear`` layers.

    Every tensor except the merged weights is shared with ``decoder`` (same storage), so the copy costs
    the adapted linear weights once more. ``None`` when an adapted layer is not a plain LoRA linear
    (DoRA, convolutions, quantized bases): those keep the unmerged path.
    """
    layers = _lora_layers(decoder)
    if not layers:
        return None
    for _, layer in layers:
        base = layer.get_base_layer()
        if type(base) is not nn.Linear or adapter not in layer.lora_A or layer.use_dora.get(adapter, False):
            return None
    clone = _shared_copy(decoder)
    with torch.no_grad():
        for name, layer in _lora_layers(clone):
            base = layer.get_base_layer()
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=base.weight.device, dtype=base.weight.dtype)
            plain.weight.copy_(base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype))
            if base.bias is not None:
                plain.bias = base.bias  # shared
            _replace(clone, name, plain)
    return clone.eval()


def base_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of ``decoder`` without its LoRA layers (each replaced by its base layer), every tensor
    shared: the base model's answers (``pool``/``full`` tokens) without switching adapters off and on
    around every decoding step. Costs module objects only."""
    clone = _shared_copy(decoder)
    for name, layer in _lora_layers(clone):
        _replace(clone, name, layer.get_base_layer())
    return clone.eval()


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the original tensors."""
    shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ------------------------------------------------------------------------------ the loop


class Answerer:
    """A model's answering state: cached prefix keys/values, the merged pass-2 decoder and an adapter-free
    view of the decoder for the base model's answers.

    Both are derived from weights, so both are keyed by ``weights_version`` and rebuilt after training
    changes the adapter; the prefix cache also by the prefix's token ids (the chat template and prompt).
    """

    def __init__(self, model: Any) -> None:
        self.model = model  # a Fwd2Bot
        self._prefixes: dict[tuple, Any] = {}
        self._merged: tuple[int, nn.Module | None] | None = None
        self._base: nn.Module | None = None

    def steps(self, tokens: Sequence[torch.Tensor], questions: Sequence[str], max_new_tokens: int,
              kind: str) -> Iterator[torch.Tensor]:
        """The (B,) greedy token ids of each decoding step for (stored tokens, question) pairs."""
        model, backbone = self.model, self.model.backbone
        adapter = PASS2 if kind == "fwd2bot" else None
        config = getattr(backbone.hf, "generation_config", None)
        with torch.inference_mode():
            embeds, mask, positions = model._pass2_batch(tokens, questions, kind)
        if not lean_supported(config):  # processors this loop does not apply: generate() answers
            with torch.inference_mode(), model.adapter(adapter):
                out = backbone.generate(embeds, mask, max_new_tokens, positions=positions)
            yield from out.T
            return
        eos = backbone.generation_eos()
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = eos[0] if backbone.tokenizer.pad_token_id is None else backbone.tokenizer.pad_token_id
        plain = self.merged() if adapter == PASS2 else self.base()  # None: switch the adapter on the peft model
        decoder = plain if plain is not None else backbone.decoder

        @contextlib.contextmanager
        def scope() -> Iterator[None]:
            """Entered around each model call, not across yields: between two tokens the caller may use
            the model (another adapter, grad mode) without changing this answer."""
            with torch.inference_mode(), contextlib.nullcontext() if plain is not None else model.adapter(adapter):
                yield

        prefix = self._shared_prefix(questions)
        embeds, mask, positions = prefix_first(embeds, mask, positions, len(prefix))
        with scope():
            cache = self._prefix_kv(decoder, adapter, prefix, embeds, positions) if prefix else None
        yield from greedy_steps(decoder, backbone.logits, backbone.hf.get_input_embeddings(),
                                embeds[:, len(prefix):], mask, positions, max_new_tokens, eos, pad, cache=cache,
                                penalty=repetition_penalty(config), scope=scope)

    def _shared_prefix(self, questions: Sequence[str]) -> tuple[int, ...]:
        """Token ids of the chat text before the stored tokens when every question shares it (else ())."""
        model = self.model
        befores = {model.backbone.chat(model.config.answer_prompt.format(question=q)).before for q in questions}
        return tuple(model.backbone.token_ids(befores.pop(), bos=True)) if len(befores) == 1 else ()

    def _prefix_kv(self, decoder: nn.Module, adapter: str | None, prefix: tuple[int, ...], embeds: torch.Tensor,
                   positions: torch.Tensor) -> Any:
        """A private copy of the prefix's keys/values, one row per answer; computed once per key."""
        n = len(prefix)
        key = (id(decoder), adapter, prefix, embeds.dtype, str(embeds.device),
               weights_version(self._adapter_params(adapter)))
        if key not in self._prefixes:
            if len(self._prefixes) >= 8:  # a handful of adapters x prompts: drop the oldest
                self._prefixes.pop(next(iter(self._prefixes)))
            ones = torch.ones(1, n, dtype=torch.long, device=embeds.device)
            out = decoder(inputs_embeds=embeds[:1, :n], attention_mask=ones, position_ids=positions[..., :1, :n],
                          use_cache=True)
            self._prefixes[key] = out.cache
        cache = copy.deepcopy(self._prefixes[key])
        if embeds.shape[0] > 1:
            cache.batch_repeat_interleave(embeds.shape[0])
        return cache

    def _adapter_params(self, adapter: str | None) -> list[torch.Tensor]:
        peft = self.model.peft
        if peft is None or adapter is None:
            return []
        return [p for n, p in peft.named_parameters() if "lora_" in n and f".{adapter}." in n]

    def base(self) -> nn.Module | None:
        """The LLM without adapters (``base_decoder``; it shares every weight, so it never goes stale)."""
        if self.model.peft is None:
            return None  # the decoder has no adapters to switch off
        if self._base is None:
            self._base = base_decoder(self.model.backbone.decoder)
        return self._base

    def merged(self) -> nn.Module | None:
        """The LLM with the pass-2 adapter merged (``merged_decoder``) when memory allows (``should_merge``);
        rebuilt when the adapter's weights changed."""
        if self.model.peft is None:
            return None
        version = weights_version(self._adapter_params(PASS2))
        if self._merged is None or self._merged[0] != version:
            self._merged = None  # the old copy goes before the new one is built
            decoder = self.model.backbone.decoder
            merge = should_merge(decoder, self.model.backbone.device)
            self._merged = (version, merged_decoder(decoder, PASS2) if merge else None)
        return self._merged[1]


def greedy_steps(decoder: nn.Module, lm_head: Callable[[torch.Tensor], torch.Tensor],
                 embed: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, max_new_tokens: int, eos: Sequence[int], pad: int,
                 cache: Any = None, penalty: float | None = None,
                 scope: Callable[[], Any] = torch.inference_mode) -> Iterator[torch.Tensor]:
    """Yield the (B,) next token ids of each greedy step; finished rows get ``pad`` after their EOS.

    ``cache`` holds the keys/values of the columns before ``embeds`` (``mask`` and ``positions`` cover
    those columns too); ``positions`` continue from each row's last one, as ``generate`` does. ``scope()``
    is entered around each step's model calls (inference mode, the adapter).
    """
    from transformers import DynamicCache
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    past = cache.get_seq_length() if cache is not None else 0
    if cache is None:
        cache = DynamicCache(config=getattr(decoder, "config", None))
    eos_t = torch.tensor(list(eos), device=embeds.device)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    process = RepetitionPenaltyLogitsProcessor(penalty) if penalty else None
    generated = torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
    step_in, step_pos = embeds, positions[..., past:]
    for _ in range(max_new_tokens):
        with scope():
            out = decoder(inputs_embeds=step_in, attention_mask=mask, position_ids=step_pos, cache=cache,
                          use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else cache
            logits = lm_head(out.last_hidden_state[:, -1]).float()
            if process is not None and generated.shape[1]:
                logits = process(generated, logits)
            token = logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad), token)
        yield token
        done |= torch.isin(token, eos_t)
        if bool(done.all()):
            return
        generated = torch.cat([generated, token[:, None]], dim=1)
        with scope():
            step_in = embed(token[:, None])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_pos = positions[..., -1:] + 1
        positions = step_pos


def stream_answer(model: Any, tokens: torch.Tensor, question: str, max_new_tokens: int, kind: str) -> Iterator[str]:
    """Text pieces of one answer as the tokens come, cut where transformers' ``TextStreamer`` cuts (whole
    words); runs in the caller's thread, so a consumer that stops iterating stops the decoding."""
    from transformers import TextStreamer

    pieces: list[str] = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    streamer = Collect(model.backbone.tokenizer, skip_special_tokens=True)
    for token in model.answerer.steps([tokens], [question], max_new_tokens, kind):
        streamer.put(token)
        yield from (p for p in pieces if p)
        pieces.clear()
    streamer.end()
    yield from (p for p in pieces if p)
