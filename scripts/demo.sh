#!/usr/bin/env bash
# The main job: generate the shapes world, index it with the default model (demo), search by text,
# and ask questions about the top hit, answered from its stored summary tokens only.
set -euo pipefail
F2B=${F2B:-.venv/bin/f2b}
PY=${PY:-.venv/bin/python}
DIR=${F2B_DEMO_DIR:-demo-data}
N=${DEMO_N:-300}
COLLECTION=${F2B_COLLECTION:-$DIR/.f2b}
export HF_HUB_OFFLINE=1

$F2B demo-data "$DIR" --n "$N" --seed 7
$F2B index "$DIR/images" --collection "$COLLECTION"

# A held-out scene's own caption is the query; its questions (with their true answers) are asked.
read -r TARGET QUERY < <($PY - "$DIR" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/captions.jsonl")]
row = next(r for r in reversed(rows) if r["split"] != "train")
print(row["image"], row["captions"][0])
PY
)
echo
echo "== search: \"$QUERY\"   (the scene it describes: $TARGET)"
$F2B search "$QUERY" --collection "$COLLECTION" -k 5
TOP=$($F2B search "$QUERY" --collection "$COLLECTION" -k 1 --json | $PY -c "import json,sys; h=json.load(sys.stdin)[0]; print(h['id'], h['path'])")
TOP_ID=${TOP%% *}
TOP_PATH=${TOP#* }
echo
echo "== ask image $TOP_ID ($TOP_PATH), from its stored tokens only"
$PY - "$DIR" "$TOP_PATH" <<'PY' | while IFS=$'\t' read -r QUESTION ANSWER; do
import json, os, sys
root, path = sys.argv[1], os.path.realpath(sys.argv[2])
rows = [json.loads(line) for line in open(f"{root}/qa.jsonl")]
mine = [r for r in rows if os.path.realpath(os.path.join(root, r["image"])) == path]
for kind in ("count", "color", "shape", "position"):
    r = next((r for r in mine if r["type"] == kind), None)
    if r:
        print(f"{r['question']}\t{r['answer']}")
PY
  printf '  Q: %s\n  A: %s   (true: %s)\n' "$QUESTION" "$($F2B ask "$TOP_ID" "$QUESTION" --collection "$COLLECTION")" "$ANSWER"
done
echo
$F2B info --collection "$COLLECTION"
