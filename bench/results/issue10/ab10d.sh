#!/bin/bash
# A/B of the align stage's data-wait share: main's loader vs issue-10d's, back to back, alternating, same bench script.
cd /work/wt10d
for rep in 1 2 3; do  # reps 1-2 in one call, rep 3 in a second
  for side in main wt10d; do
    echo "== $side rep $rep $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    PYTHONPATH=/work/$side/operator:/work/$side/trainer nice -n 5 /work/main/.venv/bin/python bench/loader_bench.py wait \
      --dir /tmp/h10d/qs --stage align --steps 300 --procs 2 --workers 1:256 --out /tmp/h10d/ab-$side-$rep.json 2>&1 | tail -2
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
