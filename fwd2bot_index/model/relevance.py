"""Relevance from stored tokens: does this image show the query? P(yes) from one pass-2 prefill.

Verified search asks pass 2, from each hit's stored tokens (no image decode, no vision tower), the
question ``config.verify_prompt`` built from the query inside the model's chat template, and reads the
logits at the first answer position: relevance = softmax over (yes, no) = sigmoid(logit_yes - logit_no).
No generation loop: one batched prefill per chunk of pairs.

"yes" and "no" are each read as the log-sum-exp over the first token of " yes" / " no" and every other
spelling that is one whole token (``yes``, `` Yes``, ``Yes``): the demo model answers " yes" (its
targets start with a space), a stock LLaVA "Yes" after "ASSISTANT:", a Qwen2-VL template "Yes" after
a newline. A token shared by both words tells nothing and is dropped.

A checkpoint may carry a calibration (``config.relevance_calibration``: temperature T and bias b fitted
on held-out data): relevance = sigmoid((logit_yes - logit_no) / T + b). Without one the raw probability
is used (T = 1, b = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .config import PASS2, StrategyError

YES_WORDS = (" yes", "yes", " Yes", "Yes")
NO_WORDS = (" no", "no", " No", "No")
#: pairs per prefill: bounds memory for long stored forms (``full``: hundreds of tokens per pair); 32 takes a
#: verify@20 in one prefill (demo model, 1 thread: 50 ms vs 56 ms in chunks of 16)
DEFAULT_BATCH = 32


def verify_question(template: str, query: str) -> str:
    """The yes/no question for ``query`` (whitespace collapsed, a trailing '.', '?' or '!' dropped)."""
    text = " ".join(str(query).split()).rstrip(" .?!")
    if not text:
        raise ValueError("the query is empty: there is nothing to verify")
    return template.format(query=text)


def answer_word_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids that start "yes" and "no": the first token of " yes" / " no", plus every other spelling
    that is one whole token (a spelling split into pieces, e.g. "n" + "o", would count every word
    starting with "n"); ids common to both words are dropped."""
    def first(words: Sequence[str]) -> set[int]:
        ids = set()
        for n, word in enumerate(words):
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if tokens and (n == 0 or len(tokens) == 1):
                ids.add(int(tokens[0]))
        return ids

    yes, no = first(YES_WORDS), first(NO_WORDS)
    shared = yes & no
    yes, no = sorted(yes - shared), sorted(no - shared)
    if not yes or not no:
        raise StrategyError("this model cannot verify hits: its tokenizer gives 'yes' and 'no' no distinct first "
                            "token; search without --verify")
    return yes, no


def calibrate(margin: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """P(yes) from logit(yes) - logit(no), through the checkpoint's temperature and bias if it has them."""
    calibration = calibration or {}
    temperature = float(calibration.get("temperature", 1.0))
    bias = float(calibration.get("bias", 0.0))
    if not temperature > 0:
        raise StrategyError(f"relevance_calibration: temperature must be positive, got {temperature}")
    return torch.sigmoid(margin / temperature + bias)


def yes_no_logits(model: Any, tokens: Sequence[torch.Tensor], questions: Sequence[str],
                  kind: str) -> torch.Tensor:
    """(B, V) next-token logits at the first answer position of each (stored tokens, question) pair.

    The pass-2 rows are laid out exactly as answering lays them out (``Fwd2Bot._pass2_batch``: left
    padding, the backbone's positions for the stored block), and run through the decoder answering
    uses (pass-2 adapter merged where memory allows, else switched on; the plain base for pool/full).
    """
    backbone = model.backbone
    adapter = PASS2 if kind == "fwd2bot" else None
    embeds, mask, positions = model._pass2_batch(tokens, questions, kind)
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    plain = model.answerer.merged() if adapter == PASS2 else model.answerer.base()
    if plain is not None:
        out = plain(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    else:
        with model.adapter(adapter):
            out = backbone.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    return backbone.logits(out.last_hidden_state[:, -1]).float()


def relevance(model: Any, tokens: Sequence[torch.Tensor], queries: Sequence[str], kind: str,
              batch_size: int = DEFAULT_BATCH, calibrated: bool = True) -> np.ndarray:
    """P(yes) in [0, 1], one per (stored tokens, query) pair, float64 numpy.

    ``calibrated=False`` gives the raw softmax over the two answer words even when the checkpoint
    carries a calibration (used to fit one).
    """
    if len(tokens) != len(queries):
        raise ValueError(f"{len(tokens)} stored-token sets but {len(queries)} queries: give one query per set")
    if kind == "fwd2bot" and model.compressor is None:
        raise StrategyError(f"stored tokens of kind 'fwd2bot' need a Fwd2Bot compressor, but {model.source} is a stock "
                            "model; verify pool or full tokens")
    if not len(tokens):
        return np.zeros(0, dtype=np.float64)
    yes, no = answer_word_ids(model.backbone.tokenizer)
    questions = [verify_question(model.config.verify_prompt, q) for q in queries]
    calibration = model.config.relevance_calibration if calibrated else None
    out = []
    with torch.inference_mode():
        for start in range(0, len(tokens), max(1, batch_size)):
            logits = yes_no_logits(model, tokens[start:start + batch_size], questions[start:start + batch_size], kind)
            margin = torch.logsumexp(logits[:, yes], dim=-1) - torch.logsumexp(logits[:, no], dim=-1)
            out.append(calibrate(margin, calibration).double().cpu().numpy())
    return np.concatenate(out)
