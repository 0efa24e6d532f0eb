"""LLaVolta's pooling *inside* the LLM: visual tokens average-pooled before decoder layer L.

LLaVolta (Beckschen/LLaVolta, ``llava_llama.py``) lets the first L layers see every visual token,
then average-pools the visual part of the hidden states (stride s keeps N/s) and continues with the
shorter sequence; the pooled tokens take the average of their members' position ids. transformers 5
builds the rotary embeddings and the causal mask once per forward, so this needs its own layer
loop: the decoder's own layers, norm, rotary embedding and mask builder, called in order, with the
sequence shortened in between. It serves Llama-style decoders (Llama, Qwen2, Mistral: the LLaVA
family); a family with other position ids (Qwen2-VL's M-RoPE) pools before the LLM instead.
"""

from __future__ import annotations

import torch

from .pooling import pool_by_stride


def supports_layer_pooling(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder`` is a Llama-style stack this loop can run (layers, norm, 1-D rotary)."""
    rotary = getattr(decoder, "rotary_emb", None)
    return (hasattr(decoder, "layers") and hasattr(decoder, "norm") and rotary is not None
            and "mrope" not in str(getattr(decoder.config, "rope_scaling", None) or ""))


def pooled_positions(length: int, start: int, count: int, stride: int) -> torch.Tensor:
    """(L',) float position ids after pooling ``count`` tokens from ``start``: each pooled token
    carries the mean position of the tokens it averages (the same pooling as the hidden states)."""
    positions = torch.arange(length, dtype=torch.float32)
    pooled = pool_by_stride(positions[start:start + count].reshape(1, count, 1), stride).reshape(-1)
    return torch.cat([positions[:start], pooled, positions[start + count:]])


def run_with_layer_pooling(decoder: torch.nn.Module, embeds: torch.Tensor, start: int, count: int, stride: int,
                           layer: int) -> torch.Tensor:
    """Final-norm hidden states of unpadded sequences (B, L, H) whose tokens ``start:start+count``
    (the visual tokens) are pooled by ``stride`` before decoder layer ``layer``.

    ``layer`` beyond the decoder's depth pools before its last layer. Returns (B, L - count +
    count // stride, H): the pooled positions are gone from the output too.
    """
    from transformers.masking_utils import create_causal_mask

    if not supports_layer_pooling(decoder):
        raise ValueError(f"{type(decoder).__name__} has no Llama-style layer stack: pool before the LLM (layer 0)")
    layers = list(decoder.layers)
    layer = max(0, min(int(layer), len(layers) - 1))
    batch, length = embeds.shape[:2]
    hidden = embeds
    positions = torch.arange(length, dtype=torch.float32, device=embeds.device).expand(batch, -1)

    def context(h: torch.Tensor, pos: torch.Tensor):
        mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        index = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        causal = create_causal_mask(config=decoder.config, inputs_embeds=h, attention_mask=mask,
                                    cache=None, position_ids=index)
        return causal, decoder.rotary_emb(h, position_ids=pos), index

    causal, rotary, index = context(hidden, positions)
    for i, block in enumerate(layers):
        if i == layer and stride > 1:
            visual = pool_by_stride(hidden[:, start:start + count], stride)
            hidden = torch.cat([hidden[:, :start], visual, hidden[:, start + count:]], dim=1)
            positions = pooled_positions(length, start, count, stride).to(embeds.device).expand(batch, -1)
            causal, rotary, index = context(hidden, positions)
        out = block(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=index)
        hidden = out[0] if isinstance(out, tuple) else out
    return decoder.norm(hidden)
