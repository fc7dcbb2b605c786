#!/usr/bin/env bash
# Everything one lent-GPU lease does (no internet there), in order, each stage under its own time limit:
#   1. the GPU speed preset (LLaVA-NeXT-7B, Qwen2.5-VL-7B, LLaVA-OneVision-7B 32-frame video, LLaVA-1.5-7B)
#   2. HoliTom's outer stage against the Qwen2-VL-7B vision tower (32 frames)
#   3. two tiny video models trained side by side (the GPU is mostly idle for either alone)
# Results are packed into OUT after every stage, so a run cut off early still returns what finished.
#   bash eval/research/gpu_all.sh OUT
set -uo pipefail
mkdir -p "$1"; OUT=$(realpath "$1"); work=$(mktemp -d); log="$OUT/log.txt"
cd "$(dirname "$0")/../.."
pack() { tar czf "$OUT/results.tgz" -C "$work" $(cd "$work" && ls -d results *.log 2>/dev/null); }
mkdir -p "$work/results"
BENCH_SECONDS=${BENCH_SECONDS:-240} bash eval/gpu_session.sh bench "$work/results" 2>&1 | tee -a "$log" | tail -n 80
pack
BENCH_SECONDS=${HOLITOM_SECONDS:-70} bash eval/gpu_session.sh holitom "$work/results" 2>&1 | tee -a "$log" | tail -n 12
pack
export TRAIN_SECONDS=${TRAIN_SECONDS:-250} SECONDS_A=${SECONDS_A:-40} SECONDS_B=${SECONDS_B:-160}
TRAIN_ARGS="--seed 0" bash eval/gpu_session.sh train-video "$work/va" > "$work/va.log" 2>&1 &
TRAIN_ARGS="--seed 1 --llm-layers 6 --lr-scale 2" bash eval/gpu_session.sh train-video "$work/vb" > "$work/vb.log" 2>&1 &
wait
for v in va vb; do
  tail -n 40 "$work/$v.log"
  [ -d "$work/$v/tiny-ov-video" ] && tar czf "$OUT/video-$v.tgz" -C "$work/$v" tiny-ov-video
done
pack
ls -la "$OUT"
