#!/usr/bin/env bash
# One lent-GPU lease for issue 7: both tiny models trained with the tower frozen after stage A
# (so that answers depend on which visual tokens are kept), side by side, then both fidelity
# benchmarks on the machine's CPUs. Every step logs its phase timings (training.json: stage_*_phase_ms, phase_ms_*),
# which says whether a step is bound by host-side data / launches or by device compute.
#   bash eval/research/gpu_train.sh OUT          (OUT gets results.tgz, image.tgz, video.tgz, log.txt)
# Defaults fit one 10-minute call; override SECONDS_A / SECONDS_B / TRAIN_SECONDS to go longer.
set -uo pipefail
mkdir -p "$1"; OUT=$(realpath "$1"); work=$(mktemp -d); log="$OUT/log.txt"
cd "$(dirname "$0")/../.."
export SECONDS_A=${SECONDS_A:-60} SECONDS_B=${SECONDS_B:-300} TRAIN_SECONDS=${TRAIN_SECONDS:-420}
# time budgets only (the step caps are out of reach); the shipped LLM warm-starts the image LLM
TRAIN_ARGS="--freeze-tower --init-llm $(pwd)/assets/tiny-llava-vqa --steps-a 100000 --steps-b 100000" \
  bash eval/gpu_session.sh train "$work/img" > "$work/img.log" 2>&1 &
# the video model starts from the shipped image model (tower, projector, LLM: eval/research/transfer.py)
TRAIN_ARGS="--freeze-tower --init-image $(pwd)/assets/tiny-llava-vqa --frames-a 1 --shape-weight 10" \
  bash eval/gpu_session.sh train-video "$work/vid" > "$work/vid.log" 2>&1 &
wait
for v in img vid; do tail -n 30 "$work/$v.log" | tee -a "$log"; done
[ -d "$work/img/tiny-llava-vqa" ] && tar czf "$OUT/image.tgz" -C "$work/img" tiny-llava-vqa
[ -d "$work/vid/tiny-ov-video" ] && tar czf "$OUT/video.tgz" -C "$work/vid" tiny-ov-video
mkdir -p "$work/results"
export FIDELITY_SECONDS=${FIDELITY_SECONDS:-120}
[ -d "$work/img/tiny-llava-vqa" ] && FIDELITY_ARGS="--model $work/img/tiny-llava-vqa --n ${FIDELITY_N:-500}" \
  bash eval/gpu_session.sh fidelity "$work/results" 2>&1 | tail -n 20 | tee -a "$log" &
# does the video tower tell shapes apart? (linear probes; the shape answers cannot beat them)
[ -d "$work/vid/tiny-ov-video" ] && PROBE_ARGS="--model $work/vid/tiny-ov-video" \
  bash eval/gpu_session.sh probe-video "$work/results" 2>&1 | tail -n 20 | tee -a "$log"
[ -d "$work/vid/tiny-ov-video" ] && FIDELITY_ARGS="--model $work/vid/tiny-ov-video --n ${FIDELITY_NV:-200}" \
  bash eval/gpu_session.sh fidelity-video "$work/results" 2>&1 | tail -n 20 | tee -a "$log" &
wait
tar czf "$OUT/results.tgz" -C "$work" results img.log vid.log
ls -la "$OUT"
