#!/bin/bash
# Before (scoring: parse) and after (scoring: probability): posttrain label with the embedded judge
# (local backend) on 16 prompts with a right and a wrong answer each (rows.jsonl beside this script, whose
# "good" column names the right one). Run from the repository root: bash examples/judge_probability/measure.sh
set -e
ROWS=$(dirname "$0")/rows.jsonl
OUT=$(mktemp -d)
for m in parse probability; do
  printf "backend: local\ncache: false\ndevice: cpu\nscoring: $m\n" > $OUT/judge_$m.yaml
  for s in score compare; do
    echo "== scoring: $m, --strategy $s"
    .venv/bin/python -m posttrain label --judge $OUT/judge_$m.yaml --data $ROWS --out $OUT/pairs_${m}_$s.jsonl \
      --strategy $s 2>&1 | grep -v "^labeled"
    .venv/bin/python -c "import json; rows = [json.loads(l) for l in open('$OUT/pairs_${m}_$s.jsonl')]; \
print('pairs', len(rows), 'chosen = the right answer', sum(r['chosen'] == r['good'] for r in rows))"
  done
done
