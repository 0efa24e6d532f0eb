"""The shapes world: scenes, rendering, captions, QA and hard negatives.

Truth is judged here by a small checker written independently of the library's parser
(``fwd2bot_index.synthetic.language``): it reads the words and the scene's cells directly.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fwd2bot_index.synthetic import (
    CATEGORIES,
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    QA_TYPES,
    SHAPES,
    Background,
    Scene,
    SceneObject,
    check_caption,
    generate_scenes,
    in_test_bucket,
    world_vocabulary,
)

SIZES = ("large", "small")
SIZE_RADIUS = {"large": 0.40, "small": 0.25}  # the renderer's documented geometry
PLURAL = {"cross": "crosses"}
REL = ("to the left of", "to the right of", "above", "below", "bigger than", "smaller than")


# ---------------------------------------------------------------- an independent checker
def _rc(obj: SceneObject) -> tuple[int, int]:
    return POSITIONS.index(obj.position) // 3, POSITIONS.index(obj.position) % 3


def _rel_holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
    (ra, ca), (rb, cb) = _rc(a), _rc(b)
    return {
        "to the left of": ca < cb,
        "to the right of": ca > cb,
        "above": ra < rb,
        "below": ra > rb,
        "bigger than": (a.size, b.size) == ("large", "small"),
        "smaller than": (a.size, b.size) == ("small", "large"),
    }[rel]


def _mention_objects(text: str, scene: Scene) -> list[SceneObject]:
    """Objects a mention like 'a small red circle at the top left' fits (asserts it is well formed)."""
    words = text.split(" at the ")
    position = words[1] if len(words) == 2 else None
    assert position is None or position in POSITIONS, text
    tokens = words[0].split()
    assert tokens[0] == ("an" if tokens[1][0] in "aeiou" else "a"), f"bad article in {text!r}"
    *attrs, shape = tokens[1:]
    assert shape in SHAPES, text
    size = attrs.pop(0) if attrs and attrs[0] in SIZES else None
    color = attrs.pop(0) if attrs else None
    assert not attrs and (color is None or color in COLORS), text
    return [
        o
        for o in scene.objects
        if o.shape == shape and color in (None, o.color) and size in (None, o.size) and position in (None, o.position)
    ]


def truth(caption: str, scene: Scene) -> bool:
    if caption.endswith(" background"):
        m = re.fullmatch(r"(\w+) shapes on a (\w+) (\w+) background", caption)
        assert m, caption
        n = ["one", "two", "three", "four"].index(m[1]) + 1
        return n == len(scene.objects) and (m[2], m[3]) == (scene.background.pattern, scene.background.tone)
    for rel in REL:
        if f" {rel} " in caption:
            left, right = caption.split(f" {rel} ")
            return any(
                _rel_holds(a, rel, b) for a in _mention_objects(left, scene) for b in _mention_objects(right, scene)
                if a is not b
            )
    head, _, last = caption.rpartition(" and ")
    parts = (head.split(", ") if head else []) + [last]
    return all(_mention_objects(p, scene) for p in parts)


def answer(question: str, scene: Scene) -> str:
    objs = scene.objects
    by_name = {f"{o.color} {o.shape}": o for o in objs}
    by_pos = {o.position: o for o in objs}
    patterns = [
        (r"what color is the object at the (.+)\?", lambda m: by_pos[m[1]].color),
        (r"what color is the (\w+)\?", lambda m: _only([o for o in objs if o.shape == m[1]]).color),
        (r"what shape is the object at the (.+)\?", lambda m: by_pos[m[1]].shape),
        (r"what shape is the (\w+) object\?", lambda m: _only([o for o in objs if o.color == m[1]]).shape),
        (r"how many objects are there\?", lambda m: str(len(objs))),
        (r"how many (\w+) objects are there\?", lambda m: str(sum(m[1] in (o.color, o.size) for o in objs))),
        (r"how many (\w+) are there\?", lambda m: str(sum(PLURAL.get(o.shape, o.shape + "s") == m[1] for o in objs))),
        (r"where is the (\w+ \w+)\?", lambda m: by_name[m[1]].position),
        (r"is there an? (\w+ \w+)\?", lambda m: "yes" if m[1] in by_name else "no"),
        (
            rf"is the (\w+ \w+) ({'|'.join(REL)}) the (\w+ \w+)\?",
            lambda m: "yes" if _rel_holds(by_name[m[1]], m[2], by_name[m[3]]) else "no",
        ),
    ]
    for pattern, fn in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            return fn(m)
    raise AssertionError(f"unknown question form: {question!r}")


def _only(objs: list[SceneObject]) -> SceneObject:
    assert len(objs) == 1, "the question names an ambiguous object"
    return objs[0]


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(150, 11, "train") + generate_scenes(60, 11, "test") + generate_scenes(60, 11, "test_unseen")


# ---------------------------------------------------------------- generation and splits
def test_same_seed_same_scenes_and_bytes() -> None:
    a, b = generate_scenes(12, 5), generate_scenes(12, 5)
    assert a == b
    for x, y in zip(a, b):
        assert _png(x.render(64)) == _png(y.render(64))
        assert (x.captions(), x.qa(), x.hard_negatives()) == (y.captions(), y.qa(), y.hard_negatives())


def test_different_seed_different_scenes() -> None:
    a, b = generate_scenes(12, 5), generate_scenes(12, 6)
    assert [s.caption for s in a] != [s.caption for s in b]
    assert _png(a[0].render()) != _png(b[0].render())


def test_more_scenes_extend_the_list() -> None:
    assert generate_scenes(30, 2)[:10] == generate_scenes(10, 2)


def test_first_captions_unique_within_a_set() -> None:
    scenes = generate_scenes(600, 0)
    firsts = [s.captions()[0] for s in scenes]
    assert len(set(firsts)) == len(firsts)
    assert all(s.captions()[0] == s.caption for s in scenes[:20])


def test_splits_keep_held_out_compositions_apart(scenes: list[Scene]) -> None:
    for s in scenes:
        pairs = {(o.color, o.shape) for o in s.objects}
        if s.split == "test_unseen":
            assert pairs & HELD_OUT_PAIRS
        else:
            assert not pairs & HELD_OUT_PAIRS
            assert in_test_bucket(s.caption) == (s.split == "test")
    train = {s.caption for s in generate_scenes(400, 11, "train")}
    assert not train & {s.caption for s in scenes if s.split != "train"}


def test_held_out_pairs_leave_every_color_and_shape_seen() -> None:
    seen = {(c, s) for c in COLORS for s in SHAPES} - HELD_OUT_PAIRS
    assert {c for c, _ in seen} == set(COLORS) and {s for _, s in seen} == set(SHAPES)
    assert len(HELD_OUT_PAIRS) == 6


def test_scene_shape(scenes: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {2, 3, 4}
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.color for s in scenes for o in s.objects} == set(COLORS)
    assert {o.size for s in scenes for o in s.objects} == set(SIZES)
    assert len({s.background.name for s in scenes}) >= 10


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_scenes(3, 0, "validation")
    with pytest.raises(ValueError, match="seed"):
        generate_scenes(3, -1)
    with pytest.raises(ValueError, match="n must"):
        generate_scenes(-2, 0)
    obj = SceneObject("circle", "red", "large", 0)
    with pytest.raises(ValueError, match="grid cell"):
        Scene((obj, SceneObject("square", "blue", "small", 0)), Background("gray", "plain"))
    with pytest.raises(ValueError, match="color, shape"):
        Scene((obj, SceneObject("circle", "red", "small", 4)), Background("gray", "plain"))
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", "large", 0)
    with pytest.raises(ValueError, match="out of its cell"):
        SceneObject("circle", "red", "large", 0, dx=0.3)


def test_round_trip_through_dict(scenes: list[Scene]) -> None:
    for s in scenes[:30]:
        back = Scene.from_dict(s.to_dict())
        assert back == s and back.captions() == s.captions() and back.hard_negatives() == s.hard_negatives()
    with pytest.raises(ValueError, match="scene record"):
        Scene.from_dict({"objects": []})


def test_import_does_not_need_torch() -> None:
    code = "import sys, fwd2bot_index.synthetic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- rendering
def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [64, 128])
def test_objects_are_visible_in_their_colour(scenes: list[Scene], size: int) -> None:
    areas: dict[tuple[str, str], list[float]] = {}
    for s in scenes[:120]:
        pixels = np.asarray(s.render(size))
        assert pixels.shape == (size, size, 3)
        cell = size / 3
        for o in s.objects:
            row, col = _rc(o)
            x, y = int((col + 0.5 + o.dx) * cell), int((row + 0.5 + o.dy) * cell)
            assert tuple(pixels[y, x]) == COLORS[o.color], (s.caption, o)
            box = pixels[int(row * cell) : int((row + 1) * cell), int(col * cell) : int((col + 1) * cell)]
            area = (box == COLORS[o.color]).all(axis=-1).mean()  # share of the cell in exactly this colour
            radius = SIZE_RADIUS[o.size]  # of the bounding circle, in cells: shapes fill 1.3 to 3.1 radius^2
            assert 1.0 < area / radius**2 < 3.7, (s.caption, o, area)
            areas.setdefault((o.shape, o.size), []).append(area)
        empty = [c for c in range(9) if c not in {POSITIONS.index(o.position) for o in s.objects}]
        for c in empty:  # no object colour leaks into an empty cell
            box = pixels[int(c // 3 * cell) : int((c // 3 + 1) * cell), int(c % 3 * cell) : int((c % 3 + 1) * cell)]
            assert not any((box == rgb).all(axis=-1).any() for rgb in COLORS.values())
    for shape in SHAPES:  # "bigger than" is visible: every large one outweighs every small one
        assert min(areas[shape, "large"]) > 1.5 * max(areas[shape, "small"]), shape


def test_render_rejects_tiny_sizes(scenes: list[Scene]) -> None:
    with pytest.raises(ValueError, match="image size"):
        scenes[0].render(16)


def test_swapped_scene_keeps_layout_and_swaps_attributes(scenes: list[Scene]) -> None:
    tried = 0
    for s in scenes:
        for kind, other in s.swapped_scenes():
            tried += 1
            changed = [(a, b) for a, b in zip(s.objects, other.objects) if a != b]
            assert len(changed) == 2
            (a1, b1), (a2, b2) = changed
            attr = "color" if kind == "swap_att" else "shape"
            assert (getattr(b1, attr), getattr(b2, attr)) == (getattr(a2, attr), getattr(a1, attr))
            assert all((a.cell, a.dx, a.dy, a.size) == (b.cell, b.dx, b.dy, b.size) for a, b in changed)
            assert not truth(s.caption, other) and truth(other.caption, other)
            if s.split == "train":
                assert not {(o.color, o.shape) for o in other.objects} & HELD_OUT_PAIRS
            # same pixels outside the two swapped objects' cells, different inside them
            diff = (np.asarray(s.render()) != np.asarray(other.render())).any(axis=-1)
            for o in s.objects:
                row, col = _rc(o)
                inside = diff[int(row * 64 / 3) : int((row + 1) * 64 / 3), int(col * 64 / 3) : int((col + 1) * 64 / 3)]
                assert inside.any() == (o in (a1, a2))
                diff[int(row * 64 / 3) : int((row + 1) * 64 / 3) + 1, int(col * 64 / 3) : int((col + 1) * 64 / 3) + 1] = False
            assert not diff.any()
    assert tried > 100


# ---------------------------------------------------------------- captions and QA
def test_captions_are_true_and_well_formed(scenes: list[Scene]) -> None:
    for s in scenes:
        caps = s.captions()
        assert len(caps) == 5
        for c in caps:
            assert truth(c, s), (c, s)
            assert check_caption(s, c)
        first = caps[0]
        assert all(f"{o.size} {o.color} {o.shape} at the {o.position}" in first for o in s.objects)
        assert any(f" {r} " in caps[3] for r in REL)


def test_checker_rejects_text_outside_the_world(scenes: list[Scene]) -> None:
    with pytest.raises(ValueError, match="dog"):
        check_caption(scenes[0], "a brown dog")
    with pytest.raises(ValueError, match="ungrammatical"):
        check_caption(scenes[0], "a orange circle")


def test_qa_answers_agree_with_the_scene(scenes: list[Scene]) -> None:
    types = Counter()
    for s in scenes:
        for row in s.qa():
            assert set(row) == {"question", "answer", "type"}
            assert answer(row["question"], s) == row["answer"], (row, s.caption)
            types[row["type"]] += 1
            if s.split == "train":
                assert not any(f"{c} {sh}" in row["question"] for c, sh in HELD_OUT_PAIRS)
    assert set(types) == set(QA_TYPES)
    answers = Counter(r["answer"] for s in scenes for r in s.qa() if r["type"] in ("existence", "relation"))
    assert answers["yes"] == answers["no"]


def test_answers_are_short_and_canonical(scenes: list[Scene]) -> None:
    allowed = set(COLORS) | set(SHAPES) | set(POSITIONS) | {"yes", "no"} | {str(k) for k in range(5)}
    assert {r["answer"] for s in scenes for r in s.qa()} <= allowed


def test_vocabulary_covers_every_text(scenes: list[Scene]) -> None:
    vocab = set(world_vocabulary())
    texts = []
    for s in scenes:
        texts += s.captions() + [t for r in s.qa() for t in (r["question"], r["answer"])]
        texts += [t for pairs in s.hard_negatives(2).values() for pair in pairs for t in pair]
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+", t)}
    assert words <= vocab, words - vocab
    assert not set(re.sub(r"[a-z0-9 ]", "", " ".join(texts))) - {",", "?"}


# ---------------------------------------------------------------- hard negatives
def _words(text: str) -> list[str]:
    """Words with 'an' read as 'a', so "a red circle" -> "an orange circle" is one word changed."""
    return ["a" if w == "an" else w for w in re.findall(r"[a-z]+", text)]


def _diff_words(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = _words(a), _words(b)
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


def _is_insertion(short: str, long: str, allowed: set[str]) -> bool:
    ws, wl = _words(short), _words(long)
    return any(wl[:k] + wl[k + 1 :] == ws and wl[k] in allowed for k in range(len(wl)))


def test_every_negative_is_false_and_its_positive_true(scenes: list[Scene]) -> None:
    counts = Counter()
    for s in scenes:
        negatives = s.hard_negatives(per_category=3)
        assert set(negatives) == set(CATEGORIES)
        for category, pairs in negatives.items():
            for pos, neg in pairs:
                assert truth(pos, s), (category, pos)
                assert not truth(neg, s), (category, neg, s.caption)
                if s.split == "train":
                    assert not any(f"{c} {sh}" in neg for c, sh in HELD_OUT_PAIRS), neg
                counts[category] += 1
    assert all(counts[c] >= len(scenes) for c in CATEGORIES), counts


def test_negatives_differ_minimally(scenes: list[Scene]) -> None:
    for s in scenes[:120]:
        for category, pairs in s.hard_negatives(per_category=3).items():
            for pos, neg in pairs:
                assert pos != neg
                if category in ("replace_obj", "replace_att"):
                    ((old, new),) = _diff_words(pos, neg)
                    vocab = set(SHAPES) if category == "replace_obj" else set(COLORS) | set(SIZES)
                    assert old in vocab and new in vocab, (pos, neg)
                elif category in ("swap_obj", "swap_att"):
                    assert Counter(_words(pos)) == Counter(_words(neg))
                    diff = _diff_words(pos, neg)
                    vocab = set(SHAPES) if category == "swap_obj" else set(COLORS)
                    assert len(diff) == 2 and {w for d in diff for w in d} <= vocab, (pos, neg)
                    assert diff[0] == diff[1][::-1]
                elif category == "replace_rel":
                    rels = [r for r in REL if f" {r} " in pos]
                    assert len(rels) == 1
                    flipped = [r for r in REL if f" {r} " in neg and r != rels[0]]
                    assert len(flipped) == 1 and pos.replace(rels[0], flipped[0]) == neg
                elif category == "add_att":
                    assert _is_insertion(pos, neg, set(COLORS) | set(SIZES)), (pos, neg)
                else:  # add_obj: one more mention, everything else kept in order
                    assert neg.count(" a ") + neg.count(" an ") == pos.count(" a ") + pos.count(" an ") + 1
                    assert [m for m in _mentions(pos)] == [m for m in _mentions(neg) if m in _mentions(pos)]


def _mentions(listing: str) -> list[str]:
    head, _, last = listing.rpartition(" and ")
    return head.split(", ") + [last]


def test_swaps_that_stay_true_are_dropped() -> None:
    """With red circle, blue square, blue circle and red square present, swapping the colours of the
    red circle and the blue square in a position-free listing is still true: it must not be offered."""
    objs = (
        SceneObject("circle", "red", "large", 0),
        SceneObject("square", "blue", "large", 2),
        SceneObject("circle", "blue", "small", 6),
        SceneObject("square", "red", "small", 8),
    )
    scene = Scene(objs, Background("gray", "plain"))
    pairs = scene.hard_negatives(per_category=50)["swap_att"]
    assert pairs
    for pos, neg in pairs:
        assert not truth(neg, scene)
        assert " at the " in neg  # only the positional listings can make a colour swap false here
