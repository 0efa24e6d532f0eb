"""Queries that no image of a gallery answers: what verified search must say "no good match" to.

A relevance cutoff is only worth trusting if it rejects queries whose composition appears in no image,
while the words themselves are ordinary words of the world (an unknown word is easy to reject). Three
kinds, each checked against every gallery scene with the world's own caption checker (``holds``):

- ``object``: one object with all four attributes (size, colour, shape, position) that no scene holds,
  e.g. "a small red star at the top left" where the gallery has red stars only elsewhere;
- ``relation``: two colour-shape mentions that both occur in the gallery, joined by a relation that no
  scene makes true ("a blue circle above a green cross");
- ``count``: more shapes than any gallery scene holds ("five shapes on a plain gray background", in
  the grammar of the world's counting captions, with numbers past its largest scene).

Deterministic for a seed; pure functions of the scenes (``Scene.from_dict`` rebuilds them from a
demo-data folder's ``scenes.jsonl``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .language import Listing, Mention, Relation, holds
from .scene import Scene
from .world import BACKGROUND_PATTERNS, BACKGROUND_TONES, COLOR_NAMES, POSITIONS, RELATIONS, SHAPES, SIZES

KINDS = ("object", "relation", "count")
#: number words past the world's own (which stop at four objects per scene)
_MORE = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_TRIES = 200  # draws per wanted query before a kind is given up (a gallery that holds nearly everything)


def _absent(statement, scenes: Sequence[Scene]) -> bool:
    return not any(holds(scene, statement) for scene in scenes)


def _objects(scenes: Sequence[Scene], n: int, rng: np.random.Generator) -> list[str]:
    out: list[str] = []
    for _ in range(n * _TRIES):
        if len(out) >= n:
            break
        mention = Mention(shape=str(rng.choice(SHAPES)), color=str(rng.choice(COLOR_NAMES)),
                          size=str(rng.choice(SIZES)), position=str(rng.choice(POSITIONS)))
        text = mention.text()
        if text not in out and _absent(Listing((mention,)), scenes):
            out.append(text)
    return out


def _relations(scenes: Sequence[Scene], n: int, rng: np.random.Generator) -> list[str]:
    present = sorted({(o.color, o.shape) for s in scenes for o in s.objects})
    if len(present) < 2:
        return []
    out: list[str] = []
    names = sorted(RELATIONS)
    for _ in range(n * _TRIES):
        if len(out) >= n:
            break
        i, j = rng.choice(len(present), size=2, replace=False)
        a, b = present[int(i)], present[int(j)]
        relation = Relation(Mention(a[1], a[0]), str(rng.choice(names)), Mention(b[1], b[0]))
        text = relation.text()
        if text not in out and _absent(relation, scenes):
            out.append(text)
    return out


def _counts(scenes: Sequence[Scene], n: int, rng: np.random.Generator) -> list[str]:
    most = max((len(s.objects) for s in scenes), default=0)
    numbers = [k for k in _MORE if k > most]
    combos = [(k, p, t) for k in numbers for p in BACKGROUND_PATTERNS for t in BACKGROUND_TONES]
    picked = rng.permutation(len(combos))[:n]
    return [f"{_MORE[combos[int(c)][0]]} shapes on a {combos[int(c)][1]} {combos[int(c)][2]} background" for c in picked]


def nonsense_queries(scenes: Sequence[Scene], n_per_kind: int = 50, seed: int = 0,
                     kinds: Sequence[str] = KINDS) -> list[tuple[str, str]]:
    """``(kind, query)`` pairs, up to ``n_per_kind`` of each kind, none true of any of ``scenes``."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown nonsense kinds {sorted(unknown)}: use {', '.join(KINDS)}")
    makers = {"object": _objects, "relation": _relations, "count": _counts}
    out: list[tuple[str, str]] = []
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, k])
        out += [(kind, q) for q in makers[kind](scenes, n_per_kind, rng)]
    return out
