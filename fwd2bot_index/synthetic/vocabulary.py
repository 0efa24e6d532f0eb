"""Every word the shapes world writes (captions, questions, answers, negatives)."""

from __future__ import annotations

from .world import (
    BACKGROUND_PATTERNS,
    BACKGROUND_TONES,
    COLOR_NAMES,
    MAX_OBJECTS,
    NUMBER_WORDS,
    POSITIONS,
    RELATIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
)

# The fixed words of the caption and question templates (language.py, qa.py).
TEMPLATE_WORDS = (
    "a an at the and shapes on background "
    "what color is object shape how many objects are there where yes no"
)


def world_vocabulary() -> list[str]:
    """Sorted, de-duplicated words (lower case; digits for counts). Punctuation used besides: ", ?"."""
    words = set(TEMPLATE_WORDS.split())
    for group in (SHAPES, SHAPE_PLURALS.values(), COLOR_NAMES, SIZES, POSITIONS, RELATIONS, BACKGROUND_PATTERNS,
                  BACKGROUND_TONES, NUMBER_WORDS.values()):
        for phrase in group:
            words.update(phrase.split())
    words.update(str(k) for k in range(MAX_OBJECTS + 1))
    return sorted(words)
