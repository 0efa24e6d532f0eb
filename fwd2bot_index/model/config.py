"""What a Fwd2Bot checkpoint records, and the strategy pair a collection is built with.

Kept free of torch so the service and CLI can read and compare these without loading a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

FORMAT_VERSION = 1
EMBED_STRATEGIES = ("fwd2bot", "prompt")
TOKEN_STRATEGIES = ("fwd2bot", "pool", "full")
#: how the contrastive heads read their tokens (``model.readout``): the paper's mean of the summary tokens and
#: last state of the text prompt, or a small token mixer over all of them
IMAGE_READOUTS = ("mean", "mixer")
TEXT_READOUTS = ("last", "mixer")
#: the mixer's shape (``model.readout.TokenMixer``; the lean query path computes the same layers in numpy): pre-norm
#: transformer layers of MIXER_HEADS heads; wider states are first projected to MAX_MIXER_WIDTH (a 2-layer mixer at
#: a 7B model's 4,096 would add ~400M parameters to a head whose job is one embedding)
MIXER_LAYERS, MIXER_HEADS, MAX_MIXER_WIDTH = 2, 4, 256

# E5-V style prompts (one-word summary, last token); the image slot is filled with visual tokens.
IMAGE_EMBED_PROMPT = "<image>\nSummary above image in one word:"
TEXT_EMBED_PROMPT = "{text}\nSummary above sentence in one word:"
COMPRESS_PROMPT = "<image>\nSummarize the image above in a few tokens:"
ANSWER_PROMPT = "<image>\n{question}"
# Verified search asks pass 2 this about each hit (``model.relevance``). The existence wording ("is there
# X?") is the one the demo world's QA trains and POPE-style probes ask of stock LVLMs.
VERIFY_PROMPT = "is there {query}?"
#: the two LoRA adapters: pass 1 compresses, pass 2 answers from the stored tokens
PASS1, PASS2 = "pass1", "pass2"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class StrategyError(ValueError):
    """A strategy name that does not parse, or one the model cannot serve."""


@dataclass(frozen=True)
class Strategy:
    """How a collection embeds (``embed``) and which tokens it stores for answers (``tokens``).

    ``budget`` is the number of stored tokens for ``pool``; for ``fwd2bot`` it is K and for
    ``full`` the number of visual tokens, both fixed by the model (recorded, not chosen).
    """

    embed: str = "prompt"
    tokens: str = "pool"
    budget: int = 16

    def __post_init__(self) -> None:
        if self.embed not in EMBED_STRATEGIES:
            raise StrategyError(f"unknown embedding strategy {self.embed!r}: use {', '.join(EMBED_STRATEGIES)}")
        if self.tokens not in TOKEN_STRATEGIES:
            raise StrategyError(f"unknown token strategy {self.tokens!r}: use {', '.join(TOKEN_STRATEGIES)}")
        if self.budget <= 0:
            raise StrategyError(f"token budget must be positive, got {self.budget}")

    @property
    def name(self) -> str:
        if self.embed == "fwd2bot" and self.tokens == "fwd2bot":
            return "fwd2bot"
        return f"{self.embed}+{self.tokens}" + (f"@{self.budget}" if self.tokens == "pool" else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        return cls(**{k: data[k] for k in ("embed", "tokens", "budget") if k in data})

    @classmethod
    def parse(cls, text: str, default_budget: int = 16) -> "Strategy":
        """Parse ``fwd2bot``, ``pool``, ``prompt``, ``full``, ``pool@8`` or ``EMBED+TOKENS[@BUDGET]``."""
        spec, _, budget_text = text.strip().partition("@")
        try:
            budget = int(budget_text) if budget_text else default_budget
        except ValueError:
            raise StrategyError(f"strategy {text!r}: the budget after '@' must be a whole number") from None
        shorthand = {
            "fwd2bot": ("fwd2bot", "fwd2bot"),
            "pool": ("prompt", "pool"),
            "prompt": ("prompt", "pool"),
            "full": ("prompt", "full"),
        }
        if spec in shorthand:
            embed, tokens = shorthand[spec]
        elif "+" in spec:
            embed, _, tokens = spec.partition("+")
        else:
            raise StrategyError(
                f"unknown strategy {text!r}: use fwd2bot, pool[@N], prompt, full or EMBED+TOKENS[@N]"
            )
        return cls(embed=embed, tokens=tokens, budget=budget)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = LORA_TARGETS


@dataclass
class Fwd2BotConfig:
    """The contents of ``fwd2bot_config.json``."""

    base_model: str = ""
    base_revision: str | None = None
    base_family: str = "llava"  # the backbone family (config model_type): llava, qwen2_vl, qwen2_5_vl
    base_signature: dict = field(default_factory=dict)
    num_summary_tokens: int = 32
    # nested budgets (``f2b train --nested``): the first k summary tokens are a trained stored form for each
    # k listed (the largest is K); empty: trained at K only. A collection may store any of them.
    nested_budgets: list = field(default_factory=list)
    hidden_size: int = 0
    embed_dim: int = 256
    pool_budget: int = 16
    # preprocessing the compressor was trained with (Qwen2-VL: min/max pixels); loading defaults to it
    image_options: dict = field(default_factory=dict)
    compress_prompt: str = COMPRESS_PROMPT
    image_embed_prompt: str = IMAGE_EMBED_PROMPT
    text_embed_prompt: str = TEXT_EMBED_PROMPT
    answer_prompt: str = ANSWER_PROMPT
    verify_prompt: str = VERIFY_PROMPT
    # Verified search's calibration of P(yes): {"temperature": T, "bias": b} gives sigmoid(margin / T + b)
    # where margin = logit(yes) - logit(no); empty (stock checkpoints): the raw probability (T=1, b=0).
    relevance_calibration: dict = field(default_factory=dict)
    # Whether re-ranking by relevance was measured to help this model's text search (verify@20 t2i R@1 at least the
    # embedding's on held-out data, ``training.demo.report.record_relevance_verdict``). False: the search page
    # searches without verification unless asked; None (not measured, e.g. stock checkpoints): it verifies.
    relevance_ranks_well: bool | None = None
    # Pass 2 receives the last decoder layer's states (after the final norm) at the K summary
    # positions, mapped back into the input-embedding space by a learned linear projection.
    summary_states: str = "last_layer_normed"
    pass2_projection: str = "linear"
    # the contrastive heads' readouts (IMAGE_READOUTS / TEXT_READOUTS); checkpoints from before they existed
    # load as mean / last, which is what they were trained with
    image_readout: str = "mean"
    text_readout: str = "last"
    lora: LoraSettings = field(default_factory=LoraSettings)
    trained_steps: int = 0
    format_version: int = FORMAT_VERSION
    versions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "fwd2bot_config.json") -> "Fwd2BotConfig":
        data = json.loads(text)
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: checkpoint format {version} is newer than this fwd2bot-index understands "
                f"({FORMAT_VERSION}); upgrade fwd2bot-index"
            )
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["lora"] = LoraSettings(**data.get("lora", {}))
        return cls(**data)

    @classmethod
    def read(cls, folder: str | Path) -> "Fwd2BotConfig":
        path = Path(folder) / "fwd2bot_config.json"
        return cls.from_json(path.read_text(), source=str(path))
