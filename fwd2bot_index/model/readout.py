"""How the contrastive heads read their tokens: the paper's plain readouts, or a small token mixer.

The plain readouts (the image embedding from the *mean* of the summary tokens, the text embedding from
the prompt's *last* state) cannot bind an attribute to its object: on the demo world the last state of
"a black square and a green triangle" lies 0.07 of a random caption's distance from that of its colour
swap, and no image head on a mean tells such a pair apart (docs/DEMO_MODEL.md, "Why swap_att stays at
chance"). A ``mixer`` readout runs two small pre-norm transformer layers over every token (the summary
tokens, or every token of the text prompt) before a masked mean, so a colour and the shape next to it can
be combined before they are averaged away. Pass 2 never reads it: answers are unchanged by the choice.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MAX_MIXER_WIDTH, MIXER_HEADS, MIXER_LAYERS


def readout_width(hidden: int, readout: str) -> int:
    """The size of the vector a readout hands its linear head."""
    return min(hidden, MAX_MIXER_WIDTH) if readout == "mixer" else hidden


class TokenMixer(nn.Module):
    """(B, L, H) token states (+ (B, L) mask of the real ones) -> (B, W): two transformer layers over the
    tokens, then the mean over the real ones. Padding changes nothing (masked in attention and in the mean)."""

    def __init__(self, hidden: int, layers: int = MIXER_LAYERS, heads: int = MIXER_HEADS):
        super().__init__()
        width = readout_width(hidden, "mixer")
        self.project = nn.Linear(hidden, width) if width != hidden else nn.Identity()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.project(states)
        if mask is None:
            return self.layers(x).mean(dim=1)
        real = mask.bool()
        mixed = self.layers(x, src_key_padding_mask=~real)
        mixed = mixed.masked_fill(~real.unsqueeze(-1), 0.0)  # whatever a padded position holds, it adds nothing
        return mixed.sum(1) / real.sum(1, keepdim=True).clamp(min=1).to(mixed.dtype)
