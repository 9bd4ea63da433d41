#!/usr/bin/env bash
# A task with no learning signal for GRPO, and the stage that gives it one: SFT first.
#
# reasoning-gym's chain_sum with three two-digit terms ("56 - 47 + 32 ="): the embedded model
# answers 2% of the held-out problems greedily and 2.4% of its samples at temperature 1.0, so
# most GRPO groups (8 samples) have all rewards equal (0) and no gradient (the doctor's
# no-signal rule fires in the first steps). Demonstrations are cheap here: the generator's own
# expression gives worked solutions ("56 - 47 = 9, 9 + 32 = 41. Answer: 41"), so:
#   1. `posttrain tasks export`: TRAIN_N rows of the task's train split;
#   2. turn each into an SFT row {prompt, completion} with the worked solution;
#   3. `posttrain train sft` on them (LoRA r64, the SFT defaults), with greedy accuracy on EVAL_N
#      held-out problems (the task's test split, disjoint from train) before and after.
#
#   examples/chain_sum_sft_first.sh [OUT_DIR]        (default: runs/chain-sum-sft)
# Environment overrides: TRAIN_N STEPS BATCH EVAL_N POSTTRAIN
set -euo pipefail

OUT=${1:-runs/chain-sum-sft}
TASK="reasoning_gym(chain_sum, min_terms=3, max_terms=3, max_digits=2)"
TRAIN_N=${TRAIN_N:-400}
STEPS=${STEPS:-40}
BATCH=${BATCH:-8}
EVAL_N=${EVAL_N:-60}
POSTTRAIN=${POSTTRAIN:-$(dirname "$0")/../.venv/bin/posttrain}
[ -x "$POSTTRAIN" ] || POSTTRAIN=posttrain
PY=$(dirname "$POSTTRAIN")/python
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"

"$POSTTRAIN" tasks export "$TASK" --split train --n "$TRAIN_N" --out "$OUT/train.jsonl" --overwrite
"$PY" - "$OUT/train.jsonl" "$OUT/demos.jsonl" <<'PYEOF'
import json, sys

def worked(expression: str) -> str:
    """'56 - 47 + 32' -> '56 - 47 = 9, 9 + 32 = 41': one step per operation, left to right."""
    tokens = expression.split()
    total, steps = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        steps.append(f"{total} {op} {term} = {new}")
        total = new
    return ", ".join(steps) + f". Answer: {total}"

with open(sys.argv[1]) as src, open(sys.argv[2], "w") as out:
    for line in src:
        row = json.loads(line)
        completion = worked(row["metadata"]["expression"])
        assert completion.endswith(f"Answer: {row['answer']}"), (completion, row["answer"])
        out.write(json.dumps({"prompt": row["prompt"], "completion": completion}) + "\n")
PYEOF

RUN="$OUT/sft"
if [ -d "$RUN" ]; then rm -rf "$RUN"; fi
"$POSTTRAIN" train sft --data "$OUT/demos.jsonl" --task "$TASK" --eval-size "$EVAL_N" --eval-max-new-tokens 48 \
    --max-steps "$STEPS" --batch-size "$BATCH" --output-dir "$OUT" --name sft --checkpoint-every 0

"$PY" - "$RUN" <<'PYEOF'
import json, sys
evals = [json.loads(line) for line in open(f"{sys.argv[1]}/evals.jsonl")]
before, after = evals[0], evals[-1]
print(f"greedy accuracy on {after['n']} held-out chain sums: {before['accuracy']:.0%} (step 0) -> "
      f"{after['accuracy']:.0%} (step {after['step']})")
PYEOF
