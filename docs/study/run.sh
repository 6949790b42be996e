#!/usr/bin/env bash
# The committed scaling study (issue 22): multilingual-e5-small at 3, 6 and 12 layers x
# mono/cross/hybrid x 5 seeds, zero-shot MLQA-R (7 languages) -> XQuAD-R (11 languages, 12
# articles drawn at random with seed 0). Run from the repository root on an otherwise idle
# machine: nohup bash docs/study/run.sh > runs/study.log 2>&1 &
# Seeds are added one at a time so that the tables (results.md/.csv/.json, plots) exist after
# each: every invocation resumes the finished cells and runs only the new seed's. Running it
# again resumes where it stopped (a cell in training from its last checkpoint).
set -euo pipefail
seeds=""
for s in 0 1 2 3 4; do
  seeds="${seeds:+$seeds,}$s"
  echo "=== seeds $seeds, start $(date -Is), load $(cut -d' ' -f1-3 /proc/loadavg)"
  hybridfast study \
    --models multilingual-e5-small@L3,multilingual-e5-small@L6,multilingual-e5-small@L12 \
    --seeds "$seeds" --steps 120 --batch-size 16 --max-length 48 \
    --eval-articles 12 --article-seed 0 --save-steps 60 --threads 2 \
    --data-dir ../shared/data --out docs/study
  echo "=== seeds $seeds, done $(date -Is), load $(cut -d' ' -f1-3 /proc/loadavg)"
done
