"""How a compressor embeds one-object phrases ("a blue square"): precision over a gallery, and how alike
the phrases' embeddings are (a mean pairwise cosine near 1 means they collapsed to one point).

    python experiments/object_phrases.py --data DIR --model M [--model M2 ...] [--split test] [--limit 300]

DIR is a demo-data folder (``f2b demo-data``, or the claims' held-out world, ``--eval-dir``); each M a
Fwd2Bot checkpoint (``demo``, or a recipe variant's ``compressor-<name>/model``). Behind
docs/DEMO_MODEL.md's k16-objects finding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fwd2bot_index.evaluation import multi_relevant_precision, read_captions_jsonl
from fwd2bot_index.imaging import load_image
from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.training.demo.measure import object_queries


def phrase_report(model: Fwd2Bot, images: list[Any], queries: list[str], relevant: np.ndarray) -> dict[str, Any]:
    """P@1/P@5/mAP of the phrases by the image embedding, and their mean pairwise cosine."""
    gallery = model.encode_images(images, batch_size=64, strategy="fwd2bot").embeddings
    phrases = model.encode_texts(queries, batch_size=64, strategy="fwd2bot")
    alike = phrases @ phrases.T
    off_diagonal = alike[~np.eye(len(queries), dtype=bool)]
    return {**multi_relevant_precision(phrases @ gallery.T, relevant),
            "phrase_cosine_mean": float(off_diagonal.mean()) if off_diagonal.size else float("nan"),
            "queries": len(queries), "images": len(images)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a demo-data folder")
    parser.add_argument("--model", action="append", required=True, help="a Fwd2Bot checkpoint (repeatable)")
    parser.add_argument("--split", default="test", help="which split's images form the gallery (default test)")
    parser.add_argument("--limit", type=int, default=300, help="gallery size (default 300)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gallery = read_captions_jsonl(args.data / "captions.jsonl", split=args.split, limit=args.limit,
                                  max_captions_per_image=1)
    images = [load_image(p).convert("RGB") for p in gallery.image_paths]
    queries, relevant = object_queries(args.data, gallery.image_paths)
    report = {name: phrase_report(Fwd2Bot.from_pretrained(name, device="cpu", dtype="fp32"), images, queries, relevant)
              for name in args.model}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
