#!/usr/bin/env bash
# The main job: generate the shapes world, index it with the default model (demo), search with a
# held-out scene's own caption, and ask that scene's questions and two about objects it does not hold,
# answered from its stored summary tokens only. It reports what happened, misses included: the rank of
# the described scene and each answer beside the true one, with a count of matches.
set -euo pipefail
F2B=${F2B:-.venv/bin/f2b}
PY=${PY:-.venv/bin/python}
DIR=${F2B_DEMO_DIR:-demo-data}
N=${DEMO_N:-300}
COLLECTION=${F2B_COLLECTION:-$DIR/.f2b}
export HF_HUB_OFFLINE=1

$F2B demo-data "$DIR" --n "$N" --seed 7
$F2B index "$DIR/images" --collection "$COLLECTION"

# One `f2b serve` of the collection loads the model once; every search and ask below goes through it
# (the CLI finds a running server of its collection by itself) instead of loading the model ten times.
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$F2B serve --collection "$COLLECTION" --port "$PORT" > "$DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
$PY - "$PORT" "$SERVER" <<'PY'
import json, os, sys, time, urllib.request
url, pid, deadline = f"http://127.0.0.1:{sys.argv[1]}/readyz", int(sys.argv[2]), time.time() + 300
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if json.loads(r.read()).get("status") == "ready":
                sys.exit(0)
    except OSError:  # not listening yet, or 503 while the model loads
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("f2b serve stopped; see serve.log")
    time.sleep(0.2)
sys.exit("f2b serve did not become ready; see serve.log")
PY

# A held-out scene (never trained on) and its scene-unique caption.
read -r TARGET QUERY < <($PY - "$DIR" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/captions.jsonl")]
row = next(r for r in reversed(rows) if r["split"] != "train")
print(row["image"], row["captions"][0])
PY
)
TARGET_PATH=$($PY -c "import os,sys; print(os.path.realpath(sys.argv[1]))" "$DIR/$TARGET")
echo
echo "== search: \"$QUERY\""
$F2B search "$QUERY" --collection "$COLLECTION" -k 5
$F2B search "$QUERY" --collection "$COLLECTION" -k "$N" --json | $PY -c '
import json, os, sys
hits, target, n = json.load(sys.stdin), sys.argv[1], int(sys.argv[2])
paths = [os.path.realpath(h["path"]) for h in hits]
if target not in paths:
    print(f"MISS: the described scene ({sys.argv[3]}) is not among the {len(hits)} results")
elif paths.index(target) == 0:
    print(f"hit: the described scene ({sys.argv[3]}) ranks 1st of {n}")
else:
    print(f"MISS: the described scene ({sys.argv[3]}) ranks {paths.index(target) + 1} of {n}, not 1st")
' "$TARGET_PATH" "$N" "$TARGET"

echo
echo "== ask the described scene ($TARGET), answered from its stored tokens only"
# One Python scores every answer with the library's exact_match, a line "answer<TAB>true answer" in, right or
# WRONG out (a Python start per question cost ~0.5 s each). Tabs and newlines in an answer become spaces, as
# exact_match's normalisation would make them.
coproc SCORER { $PY -c '
import sys
from fwd2bot_index.eval import exact_match
for line in sys.stdin:
    got, want = line.rstrip("\n").split("\t", 1)
    print("right" if exact_match(got, want) else "WRONG", flush=True)
'; }
SCORER_PROC=$SCORER_PID  # bash may unset SCORER_PID once it has exited
RIGHT=0
TOTAL=0
while IFS=$'\t' read -r QUESTION ANSWER; do
  GOT=$($F2B ask "$TARGET_PATH" "$QUESTION" --collection "$COLLECTION")
  printf '%s\t%s\n' "${GOT//[$'\t\n']/ }" "$ANSWER" >&"${SCORER[1]}"
  read -r MARK <&"${SCORER[0]}"
  if [ "$MARK" = right ]; then
    RIGHT=$((RIGHT + 1))
  fi
  TOTAL=$((TOTAL + 1))
  printf '  Q: %s\n  A: %s   (true: %s) %s\n' "$QUESTION" "$GOT" "$ANSWER" "$MARK"
done < <($PY - "$DIR" "$TARGET" <<'PY'
import json, sys
from fwd2bot_index.synthetic.qa import absent_questions
from fwd2bot_index.synthetic.scene import Scene
root, target = sys.argv[1], sys.argv[2]
for r in (json.loads(line) for line in open(f"{root}/qa.jsonl")):
    if r["image"] == target:
        print(f"{r['question']}\t{r['answer']}")
# and two about something the scene does not hold ("what color is the square?" -> "there is no square")
for r in (json.loads(line) for line in open(f"{root}/scenes.jsonl")):
    if r["image"] == target:
        for q in absent_questions(Scene.from_dict(r["scene"])):
            print(f"{q['question']}\t{q['answer']}")
PY
)
exec {SCORER[1]}>&-  # end of input: the scorer exits
wait "$SCORER_PROC"
echo "answers right: $RIGHT of $TOTAL"
echo
$F2B info --collection "$COLLECTION"
