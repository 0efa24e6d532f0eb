"""Writing a demo data set to disk (the layout of ARCHITECTURE.md, "demo-data layout").

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves
a half-written file under its final name. ``demo_data.json`` (the manifest) is written last: it is
the mark of a complete set; a run first drops the old one, and a ``.demo_data_incomplete`` marker
says a run is under way. Rerunning with the same arguments rewrites identical bytes; a rerun with a
smaller ``n`` removes the images it no longer lists (only ``images/NNNNNN.png`` names, and only in a
folder this function wrote before).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from .generate import generate_scenes
from .negatives import CATEGORIES
from .render import MIN_IMAGE_SIZE
from .scene import Scene
from .world import HELD_OUT_PAIRS, SPLITS

FORMAT_VERSION = 1
MANIFEST = "demo_data.json"
INCOMPLETE = ".demo_data_incomplete"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_IMAGE_NAME = re.compile(r"\d{6}\.png")
_OWN_FILES = ("captions.jsonl", "qa.jsonl", "scenes.jsonl", "hard_negatives.jsonl", "swapped.jsonl")


def assign_splits(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[str]:
    """Deterministic, interleaved split of indices 0..n-1: index i goes to the split furthest behind
    its share, so every prefix of the set keeps the proportions (8 train, 1 test, 1 test_unseen per 10)."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be {len(SPLITS)} non-negative numbers for {SPLITS} (got {fractions})")
    total = float(sum(fractions))
    shares = [f / total for f in fractions]
    counts = [0] * len(SPLITS)
    out = []
    for i in range(n):
        k = max(range(len(SPLITS)), key=lambda s: (shares[s] * (i + 1) - counts[s], -s))
        counts[k] += 1
        out.append(SPLITS[k])
    return out


def plan_scenes(n: int, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[Scene]:
    """The ``n`` scenes of a demo set in file order: each split's scenes are ``generate_scenes`` of
    that split, interleaved as ``assign_splits`` says."""
    splits = assign_splits(n, fractions)
    pools = {s: iter(generate_scenes(splits.count(s), seed, s)) for s in SPLITS}
    return [next(pools[s]) for s in splits]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    _write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _save_png(path: Path, image: Image.Image) -> None:
    _atomic_write(path, lambda p: image.save(p, format="PNG"))


def _check_args(n: int, seed: int, image_size: int) -> None:
    for name, value, low in (("n", n, 1), ("seed", seed, 0), ("image_size", image_size, MIN_IMAGE_SIZE)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low} (got {value!r})")


def _prepare(out: Path) -> bool:
    """Create the folders, mark the run incomplete; True when this folder held a demo set before."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; pass a folder path for the demo data")
    ours = (out / MANIFEST).exists() or (out / INCOMPLETE).exists()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "sugarcrepe").mkdir(exist_ok=True)
    (out / INCOMPLETE).write_text("a demo-data run started here and has not finished\n", encoding="utf-8")
    (out / MANIFEST).unlink(missing_ok=True)
    if ours:  # the old set's tables are about to be replaced; none may outlive a failed run
        for name in _OWN_FILES:
            (out / name).unlink(missing_ok=True)
    return ours


def _remove_stale(folder: Path, n: int) -> None:
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _IMAGE_NAME.fullmatch(path.name) and int(path.stem) >= n:
            path.unlink()


def write_demo_data(
    out_dir: str | os.PathLike[str],
    n: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    *,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    sugarcrepe_splits: Sequence[str] = ("test", "test_unseen"),
    swapped: bool = False,
) -> dict[str, Any]:
    """Write ``n`` scenes to ``out_dir`` and return the manifest (also saved as ``demo_data.json``).

    Files (paths inside them relative to ``out_dir``): ``images/NNNNNN.png``; ``captions.jsonl``
    ({"image", "captions", "split"}, scene-unique caption first); ``qa.jsonl`` ({"image", "question",
    "answer", "type"}); ``sugarcrepe/<category>.json`` (official format, ``filename`` relative to
    ``images/``, pairs of the scenes in ``sugarcrepe_splits`` only, since it is an evaluation set);
    ``hard_negatives.jsonl`` (the same pairs for every split, with "split", for training);
    ``scenes.jsonl`` ({"image", "scene"}: ``Scene.from_dict`` rebuilds the scene); and with
    ``swapped=True``, ``swapped/NNNNNN.png`` plus ``swapped.jsonl`` (image-side hard negatives).
    ``progress(done, total)`` is called after each image.
    """
    _check_args(n, seed, image_size)
    unknown = set(sugarcrepe_splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in sugarcrepe_splits; expected some of {SPLITS}")
    out = Path(out_dir)
    scenes = plan_scenes(n, seed, split_fractions)
    ours = _prepare(out)
    if swapped:
        (out / "swapped").mkdir(exist_ok=True)

    captions, qa, records, negatives, swaps = [], [], [], [], []
    sugarcrepe: dict[str, list[dict[str, str]]] = {c: [] for c in CATEGORIES}
    for i, scene in enumerate(scenes):
        name = f"{i:06d}.png"
        image = f"images/{name}"
        _save_png(out / image, scene.render(image_size))
        captions.append({"image": image, "captions": scene.captions(), "split": scene.split})
        qa += [{"image": image, **row} for row in scene.qa()]
        records.append({"image": image, "scene": scene.to_dict()})
        for category, pairs in scene.hard_negatives().items():
            for pos, neg in pairs:
                negatives.append({"image": image, "split": scene.split, "category": category,
                                  "caption": pos, "negative_caption": neg})
                if scene.split in sugarcrepe_splits:
                    sugarcrepe[category].append({"filename": name, "caption": pos, "negative_caption": neg})
        if swapped:
            swaps += _write_swapped(out, name, scene, image_size)
        if progress is not None:
            progress(i + 1, n)

    if ours:
        _remove_stale(out / "images", n)
        _remove_stale(out / "swapped", n if swapped else 0)
    _write_jsonl(out / "captions.jsonl", captions)
    _write_jsonl(out / "qa.jsonl", qa)
    _write_jsonl(out / "scenes.jsonl", records)
    _write_jsonl(out / "hard_negatives.jsonl", negatives)
    if swapped:
        _write_jsonl(out / "swapped.jsonl", swaps)
    for category, rows in sugarcrepe.items():
        table = {str(k): row for k, row in enumerate(rows)}
        _write_text(out / "sugarcrepe" / f"{category}.json", json.dumps(table, indent=4, ensure_ascii=False) + "\n")

    manifest = {
        "format_version": FORMAT_VERSION,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "split_fractions": [float(f) for f in split_fractions],
        "splits": {s: sum(sc.split == s for sc in scenes) for s in SPLITS},
        "held_out_pairs": sorted([list(p) for p in HELD_OUT_PAIRS]),
        "qa": len(qa),
        "sugarcrepe_splits": list(sugarcrepe_splits),
        "sugarcrepe": {c: len(rows) for c, rows in sugarcrepe.items()},
        "hard_negatives": len(negatives),
        "swapped": len(swaps),
    }
    _write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / INCOMPLETE).unlink(missing_ok=True)
    return manifest


def _write_swapped(out: Path, name: str, scene: Scene, image_size: int) -> list[dict[str, str]]:
    """One image-side hard negative for the scene (a colour swap when there is one), if any swap is valid."""
    options = sorted(scene.swapped_scenes(), key=lambda kv: kv[0] != "swap_att")
    if not options:
        return []
    att = [o for o in options if o[0] == "swap_att"] or options
    kind, other = att[int(scene.rng("swapped").integers(len(att)))]
    _save_png(out / "swapped" / name, other.render(image_size))
    return [{"image": f"images/{name}", "swapped_image": f"swapped/{name}", "split": scene.split,
             "category": kind, "caption": scene.caption, "negative_caption": other.caption}]
