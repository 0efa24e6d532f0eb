#!/usr/bin/env bash
# The main job: generate the shapes world, index it with the default model, search, and ask about a hit.
set -euo pipefail
F2B=${F2B:-.venv/bin/f2b}
DIR=${F2B_DEMO_DIR:-demo-data}
N=${DEMO_N:-300}
COLLECTION=${F2B_COLLECTION:-$DIR/.f2b}
export HF_HUB_OFFLINE=1

$F2B demo-data "$DIR" --n "$N" --seed 7
$F2B index "$DIR/images" --collection "$COLLECTION"
QUERY=$(python3 -c "import json,sys; rows=[json.loads(l) for l in open('$DIR/captions.jsonl')]; print(rows[-1]['captions'][0])")
echo
echo "== search: \"$QUERY\""
$F2B search "$QUERY" --collection "$COLLECTION" -k 5
TOP=$($F2B search "$QUERY" --collection "$COLLECTION" -k 1 --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['id'])")
echo
echo "== ask image $TOP: what color is the large shape?"
$F2B ask "$TOP" "what shapes are in the image?" --collection "$COLLECTION"
echo
$F2B info --collection "$COLLECTION"
