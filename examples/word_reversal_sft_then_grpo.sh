#!/usr/bin/env bash
# GRPO raising held-out accuracy on a reasoning-gym task: word_sequence_reversal (2-3 words),
# from a short SFT warm start.
#
# "Reverse this list of words: phrase, a, to" -> "to, a, phrase". The base model copies the list or
# rambles: 0% of held-out lists greedily and 0 of 64 samples at temperature 1.0 (`posttrain recommend`'s
# probe), so GRPO from it has no signal. The task has no trivial strategy: a copy of the list scores
# 0 (2 of the 200 held-out lists read the same both ways), and no number is there for the extractor's
# last-number fallback to find. So:
#   1. `posttrain tasks export`: TRAIN_N rows of the task's train split; each becomes an SFT row
#      {prompt, completion: "Answer: <answer>"};
#   2. `posttrain train sft` on them for STEPS steps of BATCH: one pass, short on purpose, so the model
#      learns the form and only part of the task;
#   3. `posttrain train grpo` from the SFT model, GRPO_STEPS steps, with greedy accuracy on EVAL_N
#      held-out lists (the task's test split, disjoint from train) at its start and end;
#   4. both models scored on the same held-out lists: mean reward (reasoning-gym's scorer), exact
#      answers, and answers that copy the list.
#
#   examples/word_reversal_sft_then_grpo.sh [OUT_DIR]     (default: runs/word-reversal)
# Environment overrides: TRAIN_N STEPS BATCH GRPO_STEPS EVAL_N POSTTRAIN
set -euo pipefail

OUT=${1:-runs/word-reversal}
TASK="rg:word_sequence_reversal(min_words=2, max_words=3)"
TRAIN_N=${TRAIN_N:-64}
STEPS=${STEPS:-8}
BATCH=${BATCH:-8}
GRPO_STEPS=${GRPO_STEPS:-40}
EVAL_N=${EVAL_N:-200}
POSTTRAIN=${POSTTRAIN:-$(dirname "$0")/../.venv/bin/posttrain}
[ -x "$POSTTRAIN" ] || POSTTRAIN=posttrain
PY=$(dirname "$POSTTRAIN")/python
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"

"$POSTTRAIN" tasks export "$TASK" --split train --n "$TRAIN_N" --out "$OUT/train.jsonl" --overwrite
"$PY" - "$OUT/train.jsonl" "$OUT/demos.jsonl" <<'PYEOF'
import json, sys
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as out:
    for line in src:
        row = json.loads(line)
        out.write(json.dumps({"prompt": row["prompt"], "completion": f"Answer: {row['answer']}"}) + "\n")
PYEOF

rm -rf "$OUT/sft" "$OUT/grpo"
"$POSTTRAIN" train sft --data "$OUT/demos.jsonl" --max-steps "$STEPS" --batch-size "$BATCH" --eval-fraction 0 \
    --output-dir "$OUT" --name sft --checkpoint-every 0
"$POSTTRAIN" train grpo --model "$OUT/sft" --task "$TASK" --max-new-tokens 24 --group-size 8 --prompts-per-step 4 \
    --temperature 1.0 --beta 0 --lora-rank 16 --lr 1e-4 --max-steps "$GRPO_STEPS" \
    --eval-every "$GRPO_STEPS" --eval-size "$EVAL_N" --output-dir "$OUT" --name grpo
"$POSTTRAIN" eval --model "$OUT/grpo" --baseline "$OUT/sft" --task "$TASK" --n "$EVAL_N" --max-new-tokens 24 \
    --examples "$EVAL_N" --json > "$OUT/eval.json"

"$PY" - "$OUT/eval.json" <<'PYEOF'
import json, re, sys
from posttrain.rewards.math import extract_answer

for model, res in json.load(open(sys.argv[1])).items():
    exact = copies = 0
    for ex in res["examples"]:
        listed = re.search(r"Reverse this list of words: (.*)\n", ex["prompt"]).group(1).strip()
        answer = ", ".join(reversed(listed.split(", ")))
        said = (extract_answer(ex["completion"]) or "").strip()
        exact += said == answer
        copies += said == listed != answer
    print(f"{model}: mean reward {res['accuracy']:.1%}, exact {exact}/{res['n']}, copies of the list {copies}")
PYEOF
