"""The Fwd2Bot double-forward bottleneck over a LLaVA backbone.

Pass 1 (compress): [chat prefix] + visual tokens + [compression prompt] + K learnable summary tokens
run through the LLM with the ``pass1`` LoRA adapter; the last-layer states at the K summary positions
are the image's *summary tokens*. A contrastive head turns them into one normalized embedding, and
texts are embedded by the same LLM and adapter (prompted, last token) through their own head; a compressor
may read all tokens through a small mixer instead (``readout.py``).

Pass 2 (answer): the stored summary tokens, projected back into the input-embedding space, stand
where the image tokens would be, and the LLM with the ``pass2`` adapter generates. No image, no
vision tower.

Training-free strategies work on any stock checkpoint with adapters disabled: E5-V style ``prompt``
embeddings, and ``pool`` / ``full`` visual tokens as the stored form.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import answering
from .backbone import LlavaBackbone
from .config import IMAGE_READOUTS, PASS1, PASS2, TEXT_READOUTS, Fwd2BotConfig, Strategy, StrategyError
from .layer_pool import run_with_layer_pooling, supports_layer_pooling
from .readout import TokenMixer, readout_width


class UntrainedCompressorError(StrategyError):
    """The fwd2bot strategy was asked of a compressor that has never been trained."""


@dataclass
class ImageEncoding:
    """What ``encode_images`` returns: one embedding and one stored-token matrix per image."""

    embeddings: np.ndarray  # (n, D) float32, L2-normalized
    tokens: np.ndarray  # (n, T, H) float32: summary, pooled or full visual tokens
    strategy: Strategy

    def __len__(self) -> int:
        return len(self.embeddings)


class Compressor(nn.Module):
    """The parameters Fwd2Bot adds to a backbone: summary tokens, heads, pass-2 projection."""

    def __init__(self, hidden: int, num_summary: int, embed_dim: int, init_std: float = 0.02,
                 image_readout: str = "mean", text_readout: str = "last"):
        super().__init__()
        if image_readout not in IMAGE_READOUTS or text_readout not in TEXT_READOUTS:
            raise StrategyError(f"unknown readout {image_readout!r} / {text_readout!r}: the image side reads "
                                f"{' or '.join(IMAGE_READOUTS)}, the text side {' or '.join(TEXT_READOUTS)} "
                                "(a checkpoint from a newer fwd2bot-index: upgrade it)")
        self.summary_tokens = nn.Parameter(torch.randn(num_summary, hidden) * init_std)
        # the readouts (``readout.py``): a token mixer is a module of its own; mean / last are parameter-free
        self.image_mixer = TokenMixer(hidden) if image_readout == "mixer" else None
        self.text_mixer = TokenMixer(hidden) if text_readout == "mixer" else None
        self.image_head = nn.Linear(readout_width(hidden, image_readout), embed_dim)
        self.text_head = nn.Linear(readout_width(hidden, text_readout), embed_dim)
        self.pass2_projection = nn.Linear(hidden, hidden)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # start as identity so pass 2 first sees the states as they are
            self.pass2_projection.weight.copy_(torch.eye(hidden))
            self.pass2_projection.bias.zero_()

    def image_vector(self, summary: torch.Tensor) -> torch.Tensor:
        """(B, k, H) summary tokens -> (B, D) image embeddings before normalisation: the readout, then the head."""
        return self.image_head(summary.mean(dim=1) if self.image_mixer is None else self.image_mixer(summary))

    def text_vector(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) left-padded states of the text prompt's tokens and their (B, L) mask -> (B, D) text embeddings
        before normalisation (the last position is every text's last token)."""
        return self.text_head(states[:, -1] if self.text_mixer is None else self.text_mixer(states, mask))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _left_pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, H) sequences left-padded with zeros; mask marks the real positions."""
    longest = max(s.shape[0] for s in seqs)
    hidden = seqs[0].shape[-1]
    out = seqs[0].new_zeros(len(seqs), longest, hidden)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, longest - s.shape[0] :] = s
        mask[i, longest - s.shape[0] :] = 1
    return out, mask


def _progress(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=desc, unit="img" if "image" in desc else "text")


class Fwd2Bot:
    """A backbone plus (optionally) a Fwd2Bot compressor, with the public encode/answer API."""

    def __init__(self, backbone: LlavaBackbone, config: Fwd2BotConfig, compressor: Compressor | None = None,
                 peft_model: Any = None, source: str | None = None):
        self.backbone = backbone
        self.config = config
        self.compressor = compressor
        self.peft = peft_model
        self.source = source  # the folder or id it was loaded from (display only, never hashed)
        self._fingerprint: str | None = None
        self._grad_adapters = False
        self._active_adapter: str | None = None
        self.answerer = answering.Answerer(self)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def stock(cls, backbone: LlavaBackbone, pool_budget: int = 16) -> "Fwd2Bot":
        """A training-free model over a stock checkpoint: (prompt, pool) strategies only."""
        config = Fwd2BotConfig(
            base_model=backbone.reference,
            base_revision=backbone.revision,
            base_family=backbone.family,
            base_signature=backbone.signature(),
            hidden_size=backbone.hidden_size,
            pool_budget=pool_budget,
            num_summary_tokens=0,
        )
        return cls(backbone, config, source=backbone.reference)

    @classmethod
    def create(cls, backbone: LlavaBackbone, num_summary_tokens: int = 32, embed_dim: int = 256,
               lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
               lora_targets: str | None = None, pool_budget: int = 16, seed: int = 0,
               image_readout: str = "mean", text_readout: str = "last") -> "Fwd2Bot":
        """A fresh, untrained compressor over ``backbone`` with two LoRA adapters (pass1, pass2)."""
        from peft import LoraConfig, get_peft_model

        from .config import LoraSettings

        lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                            target_modules=lora_targets or backbone.lora_targets)
        config = Fwd2BotConfig(
            base_model=backbone.reference,
            base_revision=backbone.revision,
            base_family=backbone.family,
            base_signature=backbone.signature(),
            num_summary_tokens=num_summary_tokens,
            hidden_size=backbone.hidden_size,
            embed_dim=embed_dim,
            pool_budget=pool_budget,
            image_readout=image_readout,
            text_readout=text_readout,
            lora=lora,
        )
        torch.manual_seed(seed)
        std = float(backbone.hf.get_input_embeddings().weight.detach().float().std())
        compressor = Compressor(backbone.hidden_size, num_summary_tokens, embed_dim, init_std=std,
                                image_readout=image_readout, text_readout=text_readout)
        compressor.to(backbone.device, backbone.dtype)
        lora_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules)
        peft_model = get_peft_model(backbone.hf, lora_config, adapter_name=PASS1)
        peft_model.add_adapter(PASS2, lora_config)
        peft_model.eval()
        return cls(backbone, config, compressor, peft_model, source=backbone.reference)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | None = "auto", dtype: str | None = "auto",
                        base: str | None = None, revision: str | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> "Fwd2Bot":
        """Load ``demo``, a Fwd2Bot checkpoint folder, or a stock LLaVA / Qwen2-VL folder or hub id.

        ``min_pixels`` / ``max_pixels`` bound the resized image of the Qwen2-VL family (default: what the
        checkpoint was trained with, else the folder's own).
        """
        from .checkpoint import load_model

        return load_model(name_or_path, device=device, dtype=dtype, base=base, revision=revision,
                          min_pixels=min_pixels, max_pixels=max_pixels)

    def save_pretrained(self, path: str, include_base: bool | None = None, base: str | None = None) -> None:
        """Write the checkpoint folder (see ``checkpoint.save_model``)."""
        from .checkpoint import save_model

        save_model(self, path, include_base=include_base, base=base)

    # -- identity --------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.compressor is not None and self.config.trained_steps > 0

    @property
    def default_strategy(self) -> Strategy:
        if self.is_trained:
            return Strategy("fwd2bot", "fwd2bot", self.config.num_summary_tokens)
        return Strategy("prompt", "pool", self.config.pool_budget)

    @property
    def image_options(self) -> dict:
        """Preprocessing settings that change what is stored (Qwen2-VL: min/max pixels); a collection records them."""
        return self.backbone.image_options()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim if self.is_trained else self.backbone.hidden_size

    def embed_dim_for(self, strategy: Strategy) -> int:
        return self.config.embed_dim if strategy.embed == "fwd2bot" else self.backbone.hidden_size

    @property
    def budgets(self) -> list[int]:
        """The numbers of summary tokens a collection may store: the nested set this compressor was
        trained for (``f2b train --nested``), else K alone; [] for a stock model."""
        from .budgets import trained_budgets

        return trained_budgets(self.config) if self.compressor is not None else []

    def token_shape(self, strategy: Strategy) -> tuple[int, int]:
        """(T, H) of the stored tokens under ``strategy``."""
        n = {"fwd2bot": strategy.budget, "full": self.backbone.num_image_tokens,
             "pool": self.backbone.pooled_tokens(strategy.budget)}[strategy.tokens]
        return n, self.backbone.hidden_size

    @property
    def fingerprint(self) -> str:
        """Content hash of the model (config + weights); never of the path it was loaded from."""
        if self._fingerprint is None:
            from .checkpoint import model_fingerprint

            self._fingerprint = model_fingerprint(self)
        return self._fingerprint

    def resolve_strategy(self, strategy: Strategy | str | None) -> Strategy:
        """Fill in defaults and refuse what this model cannot do."""
        if strategy is None:
            return self.default_strategy
        if isinstance(strategy, str):
            text, strategy = strategy, Strategy.parse(strategy, default_budget=self.config.pool_budget)
            if strategy.tokens == "fwd2bot" and "@" not in text and self.config.num_summary_tokens:
                strategy = Strategy(strategy.embed, "fwd2bot", self.config.num_summary_tokens)  # all K
        uses_compressor = "fwd2bot" in (strategy.embed, strategy.tokens)
        if uses_compressor and self.compressor is None:
            raise StrategyError(
                f"strategy {strategy.name!r} needs a Fwd2Bot compressor checkpoint, but "
                f"{self.source} is a stock model; use 'pool' or 'prompt', or train one with `f2b train`"
            )
        if uses_compressor and not self.is_trained:
            raise UntrainedCompressorError(
                f"strategy {strategy.name!r} needs a trained compressor, but {self.source} has never been "
                "trained (its summary tokens and heads are random); train it with `f2b train`, or use 'pool'"
            )
        if strategy.tokens == "fwd2bot":
            from .budgets import check_budget

            check_budget(self.config, strategy.budget, self.source)
        elif strategy.tokens == "full" and self.backbone.variable_image_tokens:
            raise StrategyError(
                f"strategy {strategy.name!r} is not available for {self.backbone.family} models: their images "
                "give a different number of visual tokens each (dynamic resolution), and a collection stores one "
                "fixed number of tokens per image; use 'pool@N' (N tokens per image whatever its size) or 'fwd2bot'"
            )
        elif strategy.tokens == "full":
            strategy = Strategy(strategy.embed, "full", self.backbone.num_image_tokens)
        return strategy

    # -- adapters --------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run with one LoRA adapter active (``None``: the plain base model).

        peft's ``set_adapter`` freezes every other adapter; during training both adapters must keep
        their gradients, so they are re-enabled after each switch.
        """
        if self.peft is None:
            if name is not None:
                raise StrategyError("this model has no Fwd2Bot adapters")
            yield
            return
        if name is None:
            with self.peft.disable_adapter():
                yield
            return
        if self._active_adapter != name:  # a switch walks every module: skip it when already active
            self.peft.set_adapter(name)
            # set_adapter makes the active adapter trainable and freezes the other; restore our choice
            self.peft.base_model.set_requires_grad([PASS1, PASS2], self._grad_adapters)
            self._active_adapter = name
        yield

    def enable_adapter_training(self, enabled: bool = True) -> None:
        """Keep both adapters trainable across switches (used by the trainer)."""
        self._grad_adapters = enabled
        if self.peft is not None:
            self.peft.base_model.set_requires_grad([PASS1, PASS2], enabled)

    # -- differentiable building blocks (used by training) -----------------------------------
    def _prompt_embeds(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(before, after) input embeddings of a chat-wrapped prompt with an image slot."""
        parts = self.backbone.chat(prompt)
        before = self.backbone.embed_ids(self.backbone.token_ids(parts.before, bos=True))
        after = self.backbone.embed_ids(self.backbone.token_ids(parts.after))
        return before, after

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.visual_tokens(pixel_values)

    def compress(self, visual: torch.Tensor, pool_stride: int = 1, pool_layer: int = 0) -> torch.Tensor:
        """Pass 1: (B, N, H) visual tokens -> (B, K, H) summary tokens (pass-1 adapter).

        ``pool_stride`` > 1 average-pools the visual tokens (LLaVolta's staged compression during
        training; stride s keeps N/s): before decoder layer ``pool_layer`` where the backbone's
        decoder allows a layer loop (``model.layer_pool``), else before the LLM.
        """
        if self.compressor is None:
            raise StrategyError("this model has no Fwd2Bot compressor")
        before, after = self._prompt_embeds(self.config.compress_prompt)
        summary = self.compressor.summary_tokens.to(before.dtype)
        if pool_stride > 1 and pool_layer > 0 and supports_layer_pooling(self.backbone.decoder) \
                and getattr(self.backbone, "family", "llava") == "llava":
            batch = visual.shape[0]
            seq = torch.cat([before.expand(batch, -1, -1), visual, after.expand(batch, -1, -1),
                             summary.expand(batch, -1, -1)], dim=1)
            with self.adapter(PASS1):
                hidden = run_with_layer_pooling(self.backbone.decoder, seq, before.shape[0], visual.shape[1],
                                                pool_stride, pool_layer)
            return hidden[:, -summary.shape[0]:]
        visual = self.backbone.pool_by_stride(visual, pool_stride)
        with self.adapter(PASS1):
            hidden = self.backbone.run_image_prompt(before, visual, after, tail=summary)
        return hidden[:, -summary.shape[0]:]

    def embed_summary(self, summary: torch.Tensor) -> torch.Tensor:
        """(B, k, H) summary tokens -> (B, D) normalized image embeddings (contrastive head: the mean of
        the tokens given, or the mixer's readout of them, then a linear layer). Given the first k of K tokens
        it is the embedding at budget k, which is what nested training trains and what ``embed_stored``
        recomputes."""
        return _normalize(self.compressor.image_vector(summary))

    def embed_stored(self, tokens: Any, budget: int | None = None, batch_size: int = 1024) -> np.ndarray:
        """Stored summary tokens (n, T, H) -> (n, D) float32 embeddings from their first ``budget``
        tokens (default all T): no image, no vision tower, no LLM, only the head (``model.budgets``)."""
        from .budgets import embed_stored

        return embed_stored(self, tokens, budget, batch_size)

    def text_states(self, texts: Sequence[str], template: str, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, H) last-layer states of every token of the prompted texts, left-padded, and their (B, L) mask:
        what the text embedding reads (its last position) and what a readout of every token would."""
        seqs = []
        for text in texts:
            parts = self.backbone.chat(template.format(text=text))
            ids = self.backbone.token_ids(parts.before + parts.after, bos=True)
            seqs.append(self.backbone.embed_ids(ids))
        embeds, mask = _left_pad(seqs)
        with self.adapter(adapter):
            return self.backbone.run_decoder(embeds, mask), mask

    def _text_last_states(self, texts: Sequence[str], template: str, adapter: str | None) -> torch.Tensor:
        return self.text_states(texts, template, adapter)[0][:, -1]  # left-padded: every text's last token

    def embed_text_batch(self, texts: Sequence[str], strategy: Strategy) -> torch.Tensor:
        """(B,) texts -> (B, D) normalized embeddings under ``strategy.embed``."""
        if strategy.embed == "fwd2bot":
            return _normalize(self.compressor.text_vector(*self.text_states(texts, self.config.text_embed_prompt, PASS1)))
        return _normalize(self._text_last_states(texts, self.config.text_embed_prompt, None))

    def prompt_embed_images(self, visual: torch.Tensor) -> torch.Tensor:
        """E5-V style: the image then 'Summary above image in one word:', last token, no adapter."""
        before, after = self._prompt_embeds(self.config.image_embed_prompt)
        with self.adapter(None):
            hidden = self.backbone.run_image_prompt(before, visual, after)
        return _normalize(hidden[:, -1])

    def pass2_parts(self, stored: torch.Tensor, question: str,
                    kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass-2 row in its three embedded pieces: chat text before the stored tokens, the stored
        tokens as the LLM reads them (projected for ``fwd2bot``), and the question's text after them."""
        stored = stored.to(self.backbone.device, self.backbone.dtype)
        if kind == "fwd2bot":
            stored = self.compressor.pass2_projection(stored)
        parts = self.backbone.chat(self.config.answer_prompt.format(question=question))
        before = self.backbone.embed_ids(self.backbone.token_ids(parts.before, bos=True))
        after = self.backbone.embed_ids(self.backbone.token_ids(parts.after))
        return before, stored, after

    def pass2_inputs(self, tokens: Sequence[torch.Tensor], questions: Sequence[str],
                     kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings: [prefix] + stored tokens + [question], per item."""
        return self._pass2_batch(tokens, questions, kind)[:2]

    def _pass2_batch(self, tokens: Sequence[torch.Tensor], questions: Sequence[str],
                     kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``pass2_inputs`` plus the position ids the backbone lays the stored block out with (``None``:
        consecutive positions; Qwen2-VL places pooled tokens on their pooled grid)."""
        seqs, blocks = [], []
        for stored, question in zip(tokens, questions):
            before, stored, after = self.pass2_parts(stored, question, kind)
            seqs.append(torch.cat([before, stored, after]))
            blocks.append((before.shape[0], stored.shape[0]))
        embeds, mask = _left_pad(seqs)
        return embeds, mask, self.backbone.stored_positions(mask, blocks, kind)

    def pass2_loss(self, summary: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                   kind: str = "fwd2bot") -> torch.Tensor:
        """Autoregressive loss of ``targets`` given summary tokens and prompts; prompt and summary
        positions are masked, so only target tokens (and their EOS) are scored."""
        eos = self.backbone.tokenizer.eos_token_id
        target_ids = [self.backbone.token_ids(" " + t.strip()) + [eos] for t in targets]
        seqs, labels = [], []
        for stored, prompt, ids in zip(summary, prompts, target_ids):
            prefix, _ = self.pass2_inputs([stored], [prompt], kind)
            target = self.backbone.embed_ids(ids)
            seqs.append(torch.cat([prefix[0], target]))
            labels.append(torch.tensor([-100] * prefix.shape[1] + ids, device=target.device))
        embeds, mask = _left_pad(seqs)
        label_tensor = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        for i, lab in enumerate(labels):
            label_tensor[i, mask.shape[1] - lab.shape[0]:] = lab
        adapter = PASS2 if kind == "fwd2bot" else None
        with self.adapter(adapter):
            hidden = self.backbone.run_decoder(embeds, mask)
        logits = self.backbone.logits(hidden[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), label_tensor[:, 1:].reshape(-1),
                               ignore_index=-100)

    # -- public inference API ---------------------------------------------------------------
    def _encode_batch(self, images: Sequence[Any], strategy: Strategy) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual_tokens(self.backbone.pixel_values(images))
        summary = None
        if "fwd2bot" in (strategy.embed, strategy.tokens):  # budget k < K: the first k of the K (causal pass 1)
            summary = self.compress(visual)
            if strategy.tokens == "fwd2bot":
                summary = summary[:, :strategy.budget]
        embedding = self.embed_summary(summary) if strategy.embed == "fwd2bot" else self.prompt_embed_images(visual)
        if strategy.tokens == "fwd2bot":
            tokens = summary
        elif strategy.tokens == "pool":
            tokens = self.backbone.pool_to_budget(visual, strategy.budget)
        else:
            tokens = visual
        return embedding, tokens

    def encode_images(self, images: Sequence[Any], batch_size: int = 16, show_progress: bool = False,
                      strategy: Strategy | str | None = None) -> ImageEncoding:
        """Images (PIL, RGB) -> normalized embeddings (n, D) and stored tokens (n, T, H), numpy."""
        strategy = self.resolve_strategy(strategy)
        embeddings, tokens = [], []
        with torch.inference_mode(), _progress(len(images), show_progress, "encoding images") as bar:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                emb, tok = self._encode_batch(chunk, strategy)
                embeddings.append(emb.float().cpu().numpy())
                tokens.append(tok.float().cpu().numpy())
                bar.update(len(chunk))
        dim = self.embed_dim_for(strategy)
        t, h = self.token_shape(strategy)
        return ImageEncoding(
            embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
            tokens=np.concatenate(tokens) if tokens else np.zeros((0, t, h), np.float32),
            strategy=strategy,
        )

    def encode_texts(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False,
                     strategy: Strategy | str | None = None) -> np.ndarray:
        """Texts -> normalized embeddings (n, D) in the same space as ``encode_images``."""
        strategy = self.resolve_strategy(strategy)
        out = []
        with torch.inference_mode(), _progress(len(texts), show_progress, "encoding texts") as bar:
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start:start + batch_size])
                out.append(self.embed_text_batch(chunk, strategy).cpu().numpy())
                bar.update(len(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim_for(strategy)), np.float32)

    def _as_tensor(self, tokens: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(tokens, dtype=np.float32)) if not torch.is_tensor(tokens) else tokens
        if t.ndim != 2 or t.shape[-1] != self.backbone.hidden_size:
            raise ValueError(
                f"stored tokens must be (T, {self.backbone.hidden_size}) for this model, got {tuple(t.shape)}: "
                "were they made by another model?"
            )
        return t

    def answer_batch(self, tokens: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 32,
                     kind: str | None = None) -> list[str]:
        """Pass 2 for several (stored tokens, question) pairs at once; greedy decoding."""
        steps = list(self.answerer.steps([self._as_tensor(t) for t in tokens], questions, max_new_tokens,
                                        kind or self.default_strategy.tokens))
        ids = torch.stack(steps, dim=1) if steps else torch.zeros(len(questions), 0, dtype=torch.long)
        return [s.strip() for s in self.backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def relevance(self, tokens: Sequence[Any], queries: Sequence[str], kind: str | None = None,
                  batch_size: int = 32, calibrated: bool = True) -> np.ndarray:
        """P(yes) that each stored image shows its query, from one pass-2 prefill per chunk of pairs
        (no decoding loop): verified search re-ranks and cuts hits by it (see ``model.relevance``)."""
        from .relevance import relevance

        return relevance(self, [self._as_tensor(t) for t in tokens], list(queries),
                         kind or self.default_strategy.tokens, batch_size=batch_size, calibrated=calibrated)

    def answer(self, tokens: Any, question: str, max_new_tokens: int = 32, stream: bool = False,
               kind: str | None = None) -> str | Iterator[str]:
        """Answer ``question`` from one image's stored tokens. ``stream=True`` yields text pieces."""
        if not stream:
            return self.answer_batch([tokens], [question], max_new_tokens, kind)[0]
        return self._answer_stream(tokens, question, max_new_tokens, kind or self.default_strategy.tokens)

    def _answer_stream(self, tokens: Any, question: str, max_new_tokens: int, kind: str) -> Iterator[str]:
        return answering.stream_answer(self, self._as_tensor(tokens), question, max_new_tokens, kind)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.compressor.parameters() if p.requires_grad] if self.compressor else []
        if self.peft is not None:
            params += [p for n, p in self.peft.named_parameters() if "lora_" in n and p.requires_grad]
        return params
