"""Question-answer pairs about a scene, with short canonical answers.

Answers are one word, a number written in digits, or a position name ("top left"), so a model's
generation can be scored by exact match. Questions never name an object ambiguously: a scene holds
at most one object of each (colour, shape), and a question names either that pair or a cell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .language import Mention, true_relations
from .world import COLOR_NAMES, HELD_OUT_PAIRS, OPPOSITE_RELATION, POSITIONS, SHAPE_PLURALS, SHAPES, SIZES

if TYPE_CHECKING:
    from .scene import Scene

QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "existence", "relation")
#: questions whose referent the scene does not hold, answered "there is no <referent>" (not in ``scene_qa``:
#: see ``absent_questions``)
ABSENT_TYPE = "absent"
#: the absent-referent templates: (question, answer) with "{}" for the missing referent's words
ABSENT_TEMPLATES: dict[str, tuple[str, str]] = {
    "color_of_shape": ("what color is the {}?", "there is no {}"),
    "color_at_cell": ("what color is the object at the {}?", "there is no object at the {}"),
    "shape_of_color": ("what shape is the {} object?", "there is no {} object"),
    "shape_at_cell": ("what shape is the object at the {}?", "there is no object at the {}"),
    "where_is": ("where is the {}?", "there is no {}"),
}


def _qa(question: str, answer: str, kind: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": kind}


def _name(obj) -> str:
    return f"{obj.color} {obj.shape}"


def color_question(scene: "Scene", rng: np.random.Generator) -> dict[str, str]:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    unique_shape = sum(o.shape == obj.shape for o in scene.objects) == 1
    if unique_shape and rng.integers(2):
        return _qa(f"what color is the {obj.shape}?", obj.color, "color")
    return _qa(f"what color is the object at the {obj.position}?", obj.color, "color")


def shape_question(scene: "Scene", rng: np.random.Generator) -> dict[str, str]:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    unique_color = sum(o.color == obj.color for o in scene.objects) == 1
    if unique_color and rng.integers(2):
        return _qa(f"what shape is the {obj.color} object?", obj.shape, "shape")
    return _qa(f"what shape is the object at the {obj.position}?", obj.shape, "shape")


def count_question(scene: "Scene", rng: np.random.Generator) -> dict[str, str]:
    objs = scene.objects
    kind = int(rng.integers(4))
    if kind == 0:
        return _qa("how many objects are there?", str(len(objs)), "count")
    if kind == 1:
        color = str(rng.choice(COLOR_NAMES))
        return _qa(f"how many {color} objects are there?", str(sum(o.color == color for o in objs)), "count")
    if kind == 2:
        shape = str(rng.choice(SHAPES))
        n = sum(o.shape == shape for o in objs)
        return _qa(f"how many {SHAPE_PLURALS[shape]} are there?", str(n), "count")
    size = str(rng.choice(SIZES))
    return _qa(f"how many {size} objects are there?", str(sum(o.size == size for o in objs)), "count")


def position_question(scene: "Scene", rng: np.random.Generator) -> dict[str, str]:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return _qa(f"where is the {_name(obj)}?", obj.position, "position")


def existence_questions(scene: "Scene", rng: np.random.Generator) -> list[dict[str, str]]:
    """One 'yes' and one 'no', so a model cannot score by always agreeing."""
    present = {o.pair for o in scene.objects}
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    absent = [
        (c, s)
        for c in COLOR_NAMES
        for s in SHAPES
        if (c, s) not in present and not (scene.split == "train" and (c, s) in HELD_OUT_PAIRS)
    ]
    color, shape = absent[int(rng.integers(len(absent)))]
    yes = _qa(f"is there {Mention.of(obj).text()}?", "yes", "existence")
    no = _qa(f"is there {Mention(shape, color).text()}?", "no", "existence")
    return [yes, no] if rng.integers(2) else [no, yes]


def relation_questions(scene: "Scene", rng: np.random.Generator) -> list[dict[str, str]]:
    """About one pair of objects: a relation that holds ('yes') and its opposite ('no')."""
    objs = scene.objects
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    rel = str(rng.choice(true_relations(a, b)))
    yes = _qa(f"is the {_name(a)} {rel} the {_name(b)}?", "yes", "relation")
    no = _qa(f"is the {_name(a)} {OPPOSITE_RELATION[rel]} the {_name(b)}?", "no", "relation")
    return [yes, no] if rng.integers(2) else [no, yes]


def _missing_referents(scene: "Scene") -> dict[str, list[str]]:
    """Per absent template, the referents this scene does not hold (a template with none is left out)."""
    objs = scene.objects
    cells = [p for p in POSITIONS if all(o.position != p for o in objs)]
    present = {o.pair for o in objs}
    pairs = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES
             if (c, s) not in present and not (scene.split == "train" and (c, s) in HELD_OUT_PAIRS)]
    options = {"color_of_shape": [s for s in SHAPES if all(o.shape != s for o in objs)],
               "color_at_cell": cells,
               "shape_of_color": [c for c in COLOR_NAMES if all(o.color != c for o in objs)],
               "shape_at_cell": cells,
               "where_is": pairs}
    return {kind: names for kind, names in options.items() if names}


def absent_question(scene: "Scene", rng: np.random.Generator, kind: str | None = None) -> dict[str, str]:
    """One question about something the scene does not hold, answered "there is no <it>".

    The world's eight questions only ever name what is there, so a model trained on them names a colour
    for "what color is the square?" in a scene without a square. ``kind`` picks the template (one of
    ``ABSENT_TEMPLATES``); by default a template with a missing referent is drawn, then the referent.
    A training scene is never asked about a held-out (colour, shape) pair.
    """
    options = _missing_referents(scene)
    if kind is None:
        kind = sorted(options)[int(rng.integers(len(options)))]
    names = options[kind]
    name = names[int(rng.integers(len(names)))]
    question, answer = ABSENT_TEMPLATES[kind]
    return {**_qa(question.format(name), answer.format(name), ABSENT_TYPE), "template": kind}


def absent_questions(scene: "Scene", n: int = 2) -> list[dict[str, str]]:
    """``n`` absent-referent questions of different templates, from the scene's own random stream (so
    held-out measurement asks the same questions every time). Kept out of ``scene_qa``: adding them there
    would change every existing question and the base was not trained on them."""
    rng = scene.rng("qa-absent")
    kinds = sorted(_missing_referents(scene))
    picked = rng.permutation(len(kinds))[:n]
    return [absent_question(scene, rng, kinds[int(i)]) for i in picked]


def scene_qa(scene: "Scene") -> list[dict[str, str]]:
    """Eight questions per scene: one each of color, shape, count, position; two of existence and relation."""
    rng = scene.rng("qa")
    return [
        color_question(scene, rng),
        shape_question(scene, rng),
        count_question(scene, rng),
        position_question(scene, rng),
        *existence_questions(scene, rng),
        *relation_questions(scene, rng),
    ]

