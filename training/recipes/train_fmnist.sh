#!/usr/bin/env bash
# The Fashion-MNIST recipe behind the shipped model, and the controls of the first model card.
#
#   bash training/recipes/train_fmnist.sh OUT_DIR            the shipped model (the config's conv stem): first a
#                                                                narrow ResNet-18 teacher (2.9M params; 60 epochs, 162 s
#                                                                on an H100), then 100 epochs of all four levels plus
#                                                                one random Mix'n'Match pass per step, every pass
#                                                                distilled from the teacher (1368 s of training alone
#                                                                on an H100); killed and rerun, each resumes
#   INDEPENDENT=1 bash training/recipes/train_fmnist.sh OUT_DIR
#                                                                the same recipe (the same teacher) at the D/2, D/4,
#                                                                D/8 inner sizes, one after another: the model card's
#                                                                nested-vs-independent rows (run three side by side
#                                                                on one H100: 697 / 614 / 531 s each)
#   CONTROLS=1 bash training/recipes/train_fmnist.sh OUT_DIR [MINUTES]
#                                                                the schedule/distillation variants and independently
#                                                                trained D/2, D/4, D/8 sizes, side by side, each to a
#                                                                time budget (default 8 minutes)
#
# The small model is launch-bound (Python dispatch), not GPU-bound; processes sharing one GPU time-slice it
# (measured: each of six ran 2-4x slower than alone, docs/notes.md), so compare runs made alone with each other.
set -u
out=${1:?output folder}; minutes=${2:-8}
recipe="--epochs 100 --batch-size 2048 --lr 3e-3 --warmup-epochs 3 --backend torch"
mkdir -p "$out"
teacher() {
    [ -f "$out/teacher/model/model.safetensors" ] || python3 -m app.cli train --arch resnet --levels 1 \
        --epochs 60 --batch-size 512 --lr 2e-3 --warmup-epochs 2 --eval-every 10 --ckpt-every 100 \
        --out "$out/teacher"
}
if [ "${INDEPENDENT:-0}" = 1 ]; then
    teacher || exit
    for size in d2:192 d4:96 d8:48; do  # inner size = expand 2 x width (96, 48, 24)
        python3 -m app.cli train $recipe --eval-every 20 --ckpt-every 50 --levels 1 \
            --teacher "$out/teacher/model" --teacher-weight 0.5 \
            --set d_inner=${size#*:} --out "$out/independent_${size%%:*}" || exit
    done
    exit
fi
if [ "${CONTROLS:-0}" != 1 ]; then
    teacher || exit
    python3 -m app.cli train $recipe --eval-every 10 --ckpt-every 25 --mnm-samples 1 \
        --teacher "$out/teacher/model" --teacher-weight 0.5 --out "$out/shipped"
    exit
fi
common="$recipe --eval-every 5 --max-minutes $minutes"
run() { name=$1; shift; python3 -m app.cli train $common --out "$out/$name" "$@" > "$out/$name.log" 2>&1 & }
run nested_all --schedule all
run nested_cycle --schedule cycle
run nested_all_distill --schedule all --distill 1.0
run independent_d2 --levels 1 --set d_inner=192   # the inner size of D/2 (expand 2 x width 96)
run independent_d4 --levels 1 --set d_inner=96
run independent_d8 --levels 1 --set d_inner=48
wait
for f in "$out"/*/result.json; do echo "$f: $(cat "$f")"; done
