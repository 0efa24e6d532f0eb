"""SugarCrepe-style hard negatives for a scene, in all seven categories.

Each category proposes minimal edits of a true caption (a listing or a relation); every proposal is
then rendered to text, parsed back and judged against the scene. Only pairs whose positive is true
and whose negative is false survive, so an edit that happens to stay true (swapping the colours of
a red circle and a blue square in a scene that also holds a blue circle and a red square) is dropped.
Negatives of 'train' scenes never name a held-out (colour, shape) pair, so no held-out composition
reaches training through the text side either.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .language import (
    Listing,
    Mention,
    Relation,
    Statement,
    full_listing,
    holds,
    parse_caption,
    placed_listing,
    short_listing,
    true_relations,
)
from .world import COLOR_NAMES, HELD_OUT_PAIRS, OPPOSITE_RELATION, POSITIONS, SHAPES, SIZES

if TYPE_CHECKING:
    from .scene import Scene

CATEGORIES: tuple[str, ...] = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)

Proposal = tuple[Statement, Statement]
# Proposals are built lazily (most are never looked at): a proposer returns zero-argument recipes.
Recipe = Callable[[], Proposal]


def _edit(listing: Listing, k: int, **changes: str | None) -> Listing:
    mentions = list(listing.mentions)
    mentions[k] = mentions[k].with_(**changes)
    return Listing(tuple(mentions))


def _swap(listing: Listing, k: int, l: int, attr: str) -> Listing:
    a, b = listing.mentions[k], listing.mentions[l]
    out = _edit(listing, k, **{attr: getattr(b, attr)})
    return _edit(out, l, **{attr: getattr(a, attr)})


def _edited(base: Listing, k: int, **changes: str | None) -> Proposal:
    return base, _edit(base, k, **changes)


def _swapped(base: Listing, k: int, l: int, attr: str) -> Proposal:
    return base, _swap(base, k, l, attr)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _pairs(n: int) -> Iterator[tuple[int, int]]:
    return ((k, l) for k in range(n) for l in range(k + 1, n))


def replace_obj(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    out = []
    for base in (short_listing(scene), full_listing(scene)):
        for k, m in enumerate(base.mentions):
            out += [partial(_edited, base, k, shape=s) for s in SHAPES if s != m.shape]
    return out


def replace_att(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    out = []
    for base in (short_listing(scene), full_listing(scene)):
        for k, m in enumerate(base.mentions):
            out += [partial(_edited, base, k, color=c) for c in COLOR_NAMES if c != m.color]
    full = full_listing(scene)
    for k, m in enumerate(full.mentions):
        out.append(partial(_edited, full, k, size="small" if m.size == "large" else "large"))
    return out


def _flipped(positive: Relation) -> Proposal:
    return positive, Relation(positive.subject, OPPOSITE_RELATION[positive.relation], positive.obj)


def replace_rel(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            for rel in true_relations(a, b):
                out.append(partial(_flipped, Relation(Mention.of(a), rel, Mention.of(b))))
    return out


def _swaps(scene: "Scene", attr: str) -> list[Recipe]:
    out = []
    for base in (short_listing(scene), full_listing(scene)):
        for k, l in _pairs(len(base.mentions)):
            if getattr(base.mentions[k], attr) != getattr(base.mentions[l], attr):
                out.append(partial(_swapped, base, k, l, attr))
    return out


def swap_obj(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    return _swaps(scene, "shape")


def swap_att(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    return _swaps(scene, "color")


def _inserted(base: Listing, at: int, extra: Mention) -> Proposal:
    mentions = list(base.mentions)
    mentions.insert(at, extra)
    return base, Listing(tuple(mentions))


def add_obj(scene: "Scene", rng: np.random.Generator, tries: int = 8) -> list[Recipe]:
    """An extra object: a (colour, shape) not in the scene, or a fully described one in an empty cell."""
    short, full = short_listing(scene), full_listing(scene)
    used = {o.cell for o in scene.objects}
    empty = [c for c in range(len(POSITIONS)) if c not in used]
    out = []
    for _ in range(tries):
        color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
        out.append(partial(_inserted, short, int(rng.integers(len(short.mentions) + 1)), Mention(shape, color)))
        if empty:
            cell = empty[int(rng.integers(len(empty)))]
            extra = Mention(shape, color, _pick(rng, SIZES), POSITIONS[cell])
            at = sum(o.cell < cell for o in scene.objects)  # keep reading order
            out.append(partial(_inserted, full, at, extra))
    return out


def _colored(bare: Listing, k: int, color: str) -> Proposal:
    return bare, _edit(bare, k, color=color)


def add_att(scene: "Scene", rng: np.random.Generator) -> list[Recipe]:
    """A false attribute added to a mention that lacked it: a colour, or a size."""
    out = []
    short, placed = short_listing(scene), placed_listing(scene)
    for k, m in enumerate(short.mentions):
        bare = _edit(short, k, color=None)
        out += [partial(_colored, bare, k, c) for c in COLOR_NAMES if c != m.color]
    for base in (short, placed):
        for k, obj in enumerate(scene.objects):
            out.append(partial(_edited, base, k, size="small" if obj.size == "large" else "large"))
    return out


PROPOSERS: dict[str, Callable[["Scene", np.random.Generator], list[Recipe]]] = {
    "replace_obj": replace_obj,
    "replace_att": replace_att,
    "replace_rel": replace_rel,
    "swap_obj": swap_obj,
    "swap_att": swap_att,
    "add_obj": add_obj,
    "add_att": add_att,
}


def _mentions(statement: Statement) -> tuple[Mention, ...]:
    if isinstance(statement, Listing):
        return statement.mentions
    if isinstance(statement, Relation):
        return (statement.subject, statement.obj)
    return ()


def names_held_out(statement: Statement) -> bool:
    """Whether a statement names a held-out (colour, shape) composition."""
    return any((m.color, m.shape) in HELD_OUT_PAIRS for m in _mentions(statement))


def verified(scene: "Scene", positive: str, negative: str) -> bool:
    """Judge the *texts*: the positive must parse and hold, the negative must parse and fail."""
    neg = parse_caption(negative)
    if scene.split == "train" and names_held_out(neg):
        return False
    return holds(scene, parse_caption(positive)) and not holds(scene, neg)


def scene_hard_negatives(scene: "Scene", per_category: int = 1) -> dict[str, list[tuple[str, str]]]:
    """Up to ``per_category`` verified (caption, negative_caption) pairs per category, chosen at random
    (from the scene's own seed) among all verified proposals; a category can be empty for a scene."""
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0 (got {per_category})")
    out: dict[str, list[tuple[str, str]]] = {}
    for category in CATEGORIES:
        rng = scene.rng(f"negatives/{category}")
        proposals = PROPOSERS[category](scene, rng)
        chosen: list[tuple[str, str]] = []
        for idx in rng.permutation(len(proposals)):
            if len(chosen) >= per_category:
                break
            positive, negative = (s.text() for s in proposals[int(idx)]())
            if (positive, negative) not in chosen and verified(scene, positive, negative):
                chosen.append((positive, negative))
        out[category] = chosen
    return out
