"""The fixed vocabulary of the shapes world and its two small value types.

Everything a scene can contain is listed here, once, so captions, questions, the renderer and
the checker all agree on names and nothing else can sneak into a generated text.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}

# Saturated, well separated colours (pairwise RGB distance >= 100) so that a 64 px vision tower
# can tell them apart; backgrounds are checked against these below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "orange": (245, 140, 20),
    "purple": (150, 50, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SIZES: tuple[str, ...] = ("large", "small")
# Radius of the shape's bounding circle, as a fraction of the grid cell's side.
SIZE_RADIUS: dict[str, float] = {"large": 0.40, "small": 0.25}

# Grid cells in reading order (row-major); an object's position is its cell.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)

# Background tones are chosen away from every object colour; patterns vary the texture.
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "slate": (62, 78, 96),
    "sand": (205, 190, 150),
    "sage": (150, 175, 140),
}
BACKGROUND_PATTERNS: tuple[str, ...] = ("plain", "gradient", "noisy")
# How far a pattern moves a pixel away from the tone (per channel, both ways).
PATTERN_AMPLITUDE: dict[str, int] = {"plain": 0, "gradient": 30, "noisy": 16}
# An object colour must be at least this far (RGB Euclidean) from every background pixel.
MIN_CONTRAST: float = 80.0

# Compositions never shown in 'train': one per shape, six different colours, so every colour and
# every shape on its own is still seen in training (only the pairing is new).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "cross"),
        ("yellow", "diamond"),
        ("purple", "circle"),
        ("white", "square"),
    }
)

SPLITS: tuple[str, ...] = ("train", "test", "test_unseen")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MIN_OBJECTS, MAX_OBJECTS = 2, 4


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell; ``dx``/``dy`` nudge it inside the cell (fractions of a cell)."""

    shape: str
    color: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLOR_NAMES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if not 0 <= self.cell < len(POSITIONS):
            raise ValueError(f"cell {self.cell} is outside the 3x3 grid (0..8)")
        if abs(self.dx) > max_jitter(self.size) + 1e-9 or abs(self.dy) > max_jitter(self.size) + 1e-9:
            raise ValueError(f"offset ({self.dx}, {self.dy}) would push a {self.size} object out of its cell")

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def pair(self) -> tuple[str, str]:
        """The (color, shape) composition, the unit the held-out split is defined on."""
        return (self.color, self.shape)


@dataclass(frozen=True)
class Background:
    """A background: a tone, a pattern, and the seed of the pattern's randomness (noise, direction)."""

    tone: str
    pattern: str
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tone not in BACKGROUND_TONES:
            raise ValueError(f"unknown background tone {self.tone!r}; expected one of {tuple(BACKGROUND_TONES)}")
        if self.pattern not in BACKGROUND_PATTERNS:
            raise ValueError(f"unknown background pattern {self.pattern!r}; expected one of {BACKGROUND_PATTERNS}")

    @property
    def name(self) -> str:
        return f"{self.pattern} {self.tone}"

    def extremes(self) -> list[tuple[int, int, int]]:
        """The darkest and lightest pixel this background can have (its pattern's range)."""
        amp = PATTERN_AMPLITUDE[self.pattern]
        base = BACKGROUND_TONES[self.tone]
        return [tuple(min(255, max(0, c + s * amp)) for c in base) for s in (-1, 1)]  # type: ignore[misc]

    def contrasts_with(self, color: str) -> bool:
        """True when every pixel of this background is far enough from ``color`` to see an object."""
        rgb = COLORS[color]
        return all(_distance(rgb, px) >= MIN_CONTRAST for px in self.extremes())


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5)


def max_jitter(size: str) -> float:
    """Largest offset (fraction of a cell) that keeps an object of ``size`` well inside its cell."""
    return round((0.5 - SIZE_RADIUS[size]) * 0.6, 6)


def left_of(a: SceneObject, b: SceneObject) -> bool:
    return a.col < b.col


def above(a: SceneObject, b: SceneObject) -> bool:
    return a.row < b.row


def bigger(a: SceneObject, b: SceneObject) -> bool:
    return a.size == "large" and b.size == "small"


# Relation phrase -> predicate(a, b) meaning "a REL b"; each has an opposite for replace_rel.
RELATIONS = {
    "to the left of": left_of,
    "to the right of": lambda a, b: left_of(b, a),
    "above": above,
    "below": lambda a, b: above(b, a),
    "bigger than": bigger,
    "smaller than": lambda a, b: bigger(b, a),
}
OPPOSITE_RELATION: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
    "bigger than": "smaller than",
    "smaller than": "bigger than",
}


def article(word: str) -> str:
    """'an' before a vowel sound ("an orange circle"), else 'a'."""
    return "an" if word[0] in "aeiou" else "a"
