#!/usr/bin/env bash
# The Fashion-MNIST recipe behind the shipped model, and its controls, run side by side on one GPU.
# The small model is launch-bound (Python dispatch), not GPU-bound; processes sharing one GPU time-slice it
# (measured: each of six ran 2-4x slower than alone, docs/notes.md), so ONLY_MAIN=1 runs the shipped model alone.
# Usage: bash vision_model/recipes/train_fmnist.sh OUT_DIR [MINUTES]   (ONLY_MAIN=1: the shipped model's run alone)
set -u
out=${1:?output folder}; minutes=${2:-8}
common="--epochs 60 --batch-size 2048 --lr 3e-3 --warmup-epochs 3 --eval-every 5 --backend torch --max-minutes $minutes"
run() { name=$1; shift; python3 -m retrieval.cli train $common --out "$out/$name" "$@" > "$out/$name.log" 2>&1 & }
mkdir -p "$out"
run nested_all --schedule all
[ "${ONLY_MAIN:-0}" = 1 ] && { wait; cat "$out"/nested_all/result.json; exit; }
run nested_cycle --schedule cycle
run nested_all_distill --schedule all --distill 1.0
run independent_d2 --levels 1 --set d_inner=192   # the inner size of D/2 (expand 2 x width 96)
run independent_d4 --levels 1 --set d_inner=96
run independent_d8 --levels 1 --set d_inner=48
wait
for f in "$out"/*/result.json; do echo "$f: $(cat "$f")"; done
