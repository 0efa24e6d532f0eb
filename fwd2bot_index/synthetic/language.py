"""Captions of the shapes world, and the checker that reads a caption back and judges it.

A caption is built from *mentions* (an object as a sentence names it: shape, and optionally colour,
size and position). The checker parses caption text with the same small grammar and evaluates it
against the scene, so a hard negative is judged by what its words say, not by how it was made.

Grammar (all lower case)::

    listing  := mention (", " mention)* " and " mention | mention
    relation := mention " " RELATION " " mention
    counting := NUMBER " shapes on a " PATTERN " " TONE " background"
    mention  := ("a" | "an") [" " SIZE] [" " COLOR] " " SHAPE [" at the " POSITION]

A mention is true when some object has every attribute it names; a listing when all its mentions
are; a relation when some pair of distinct objects fits both mentions and the relation holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence, Union

from .world import (
    BACKGROUND_PATTERNS,
    BACKGROUND_TONES,
    COLOR_NAMES,
    NUMBER_WORDS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneObject,
    article,
)

if TYPE_CHECKING:
    from .scene import Scene


@dataclass(frozen=True)
class Mention:
    """An object as a caption names it; unnamed attributes are left open (None)."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None

    @classmethod
    def of(cls, obj: SceneObject, *, color: bool = True, size: bool = False, position: bool = False) -> "Mention":
        return cls(
            shape=obj.shape,
            color=obj.color if color else None,
            size=obj.size if size else None,
            position=obj.position if position else None,
        )

    def text(self) -> str:
        words = [w for w in (self.size, self.color, self.shape) if w]
        out = f"{article(words[0])} {' '.join(words)}"
        return f"{out} at the {self.position}" if self.position else out

    def matches(self, obj: SceneObject) -> bool:
        return (
            obj.shape == self.shape
            and self.color in (None, obj.color)
            and self.size in (None, obj.size)
            and self.position in (None, obj.position)
        )

    def with_(self, **changes: str | None) -> "Mention":
        return replace(self, **changes)


@dataclass(frozen=True)
class Listing:
    mentions: tuple[Mention, ...]

    def text(self) -> str:
        parts = [m.text() for m in self.mentions]
        if len(parts) == 1:
            return parts[0]
        return ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class Relation:
    subject: Mention
    relation: str
    obj: Mention

    def text(self) -> str:
        return f"{self.subject.text()} {self.relation} {self.obj.text()}"


@dataclass(frozen=True)
class Counting:
    count: int
    pattern: str
    tone: str

    def text(self) -> str:
        return f"{NUMBER_WORDS[self.count]} shapes on a {self.pattern} {self.tone} background"


Statement = Union[Listing, Relation, Counting]


def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_MENTION_RE = re.compile(
    rf"(?P<art>an?) (?:(?P<size>{_alternatives(SIZES)}) )?(?:(?P<color>{_alternatives(COLOR_NAMES)}) )?"
    rf"(?P<shape>{_alternatives(SHAPES)})(?: at the (?P<position>{_alternatives(POSITIONS)}))?"
)
_RELATION_RE = re.compile(rf"(?P<subject>.+?) (?P<relation>{_alternatives(list(RELATIONS))}) (?P<obj>.+)")
_NUMBER_BY_WORD = {w: n for n, w in NUMBER_WORDS.items()}
_COUNTING_RE = re.compile(
    rf"(?P<n>{_alternatives(list(_NUMBER_BY_WORD))}) shapes on a (?P<pattern>{_alternatives(BACKGROUND_PATTERNS)})"
    rf" (?P<tone>{_alternatives(list(BACKGROUND_TONES))}) background"
)


def parse_mention(text: str) -> Mention:
    match = _MENTION_RE.fullmatch(text)
    if not match:
        raise ValueError(f"not a mention of the shapes world: {text!r}")
    mention = Mention(match["shape"], match["color"], match["size"], match["position"])
    if mention.text() != text:  # catches a wrong article ("a orange circle")
        raise ValueError(f"ungrammatical mention {text!r} (expected {mention.text()!r})")
    return mention


def parse_caption(text: str) -> Statement:
    """Parse a caption of this world; ValueError names the caption when it is outside the grammar."""
    counting = _COUNTING_RE.fullmatch(text)
    if counting:
        return Counting(_NUMBER_BY_WORD[counting["n"]], counting["pattern"], counting["tone"])
    relation = _RELATION_RE.fullmatch(text)
    if relation:
        return Relation(parse_mention(relation["subject"]), relation["relation"], parse_mention(relation["obj"]))
    head, sep, last = text.rpartition(" and ")
    parts = (head.split(", ") + [last]) if sep else [text]
    return Listing(tuple(parse_mention(p) for p in parts))


def holds(scene: "Scene", statement: Statement) -> bool:
    """Whether ``statement`` is true of ``scene`` (see the module docstring for the semantics)."""
    objects = scene.objects
    if isinstance(statement, Counting):
        bg = scene.background
        return statement.count == len(objects) and (statement.pattern, statement.tone) == (bg.pattern, bg.tone)
    if isinstance(statement, Relation):
        test = RELATIONS[statement.relation]
        return any(
            statement.subject.matches(a) and statement.obj.matches(b) and test(a, b)
            for a in objects
            for b in objects
            if a is not b
        )
    return all(any(m.matches(o) for o in objects) for m in statement.mentions)


def check_caption(scene: "Scene", caption: str) -> bool:
    """Parse ``caption`` and say whether it is true of ``scene``."""
    return holds(scene, parse_caption(caption))


def full_listing(scene: "Scene") -> Listing:
    """Every object with size, colour, shape and position, in reading order: unique to the scene."""
    return Listing(tuple(Mention.of(o, size=True, position=True) for o in scene.objects))


def placed_listing(scene: "Scene") -> Listing:
    return Listing(tuple(Mention.of(o, position=True) for o in scene.objects))


def short_listing(scene: "Scene") -> Listing:
    return Listing(tuple(Mention.of(o) for o in scene.objects))


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """The relation phrases that hold for "a REL b", in a fixed order."""
    return [name for name, test in RELATIONS.items() if test(a, b)]


def scene_captions(scene: "Scene") -> list[str]:
    """Captions from most to least detailed; the first one describes the scene uniquely."""
    rng = scene.rng("captions")
    objs = scene.objects
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    relation = str(rng.choice(true_relations(objs[i], objs[j])))
    bg = scene.background
    statements: list[Statement] = [
        full_listing(scene),
        placed_listing(scene),
        short_listing(scene),
        Relation(Mention.of(objs[i]), relation, Mention.of(objs[j])),
        Counting(len(objs), bg.pattern, bg.tone),
    ]
    return [s.text() for s in statements]
