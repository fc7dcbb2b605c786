#!/usr/bin/env bash
# One lent-GPU session (no internet there): the GPU speed preset and/or training the tiny VQA model.
#   bash eval/gpu_session.sh bench|holitom|vllm|train|train-video|probe-video|fidelity|fidelity-video OUT_DIR
# Uses the machine's own torch/transformers; tokenprune is put on PYTHONPATH from a copy laid out as
# the installed package (tokenprune/, tokenprune/patches, tokenprune/eval) so no pip is needed.
set -uo pipefail
what="$1"; mkdir -p "$2"; out=$(realpath "$2")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
shim=$(mktemp -d)
cp -r tokenprune "$shim/" && cp -r patches "$shim/tokenprune/patches" && cp -r eval "$shim/tokenprune/eval"
export PYTHONPATH="$shim"
cd "$shim"   # python puts the working directory first on sys.path: not the repo's un-mapped layout
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, tokenprune; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tokenprune', tokenprune.__version__)"
case "$what" in
  bench) timeout -s TERM "${BENCH_SECONDS:-230}" python3 -m tokenprune.eval.bench.run --preset gpu --out "$out" ${BENCH_ARGS:-} 2>&1 \
           | tr '\r' '\n' | grep -v '^bench: .*it\]$' ;;
  vllm) # the serving bench (eval/bench/vllm_serve.py): needs vllm on that machine; the plugin is found
        # through an entry point, which the PYTHONPATH copy gets from a minimal dist-info folder
        if ! python3 -c "import vllm" 2>/dev/null; then echo "no vllm on this machine: nothing to run"; exit 3; fi
        di="$shim/tokenprune-0.0.0.dist-info"; mkdir -p "$di"
        printf 'Metadata-Version: 2.1\nName: tokenprune\nVersion: 0.0.0\n' > "$di/METADATA"
        printf '[vllm.general_plugins]\ntokenprune = tokenprune.vllm:register\n' > "$di/entry_points.txt"
        timeout -s TERM "${BENCH_SECONDS:-540}" python3 -m tokenprune.eval.bench.vllm_serve --preset gpu --out "$out" 2>&1 \
           | tr '\r' '\n' | grep -v 'it\]$' ;;
  holitom) timeout -s TERM "${BENCH_SECONDS:-120}" python3 -m tokenprune.eval.bench.holitom --preset gpu --out "$out" 2>&1 \
           | tr '\r' '\n' | grep -v 'it\]$' ;;
  train-video) timeout -s TERM "${TRAIN_SECONDS:-340}" python3 -m tokenprune.eval.research.train_video --device "${DEVICE:-cuda}" \
           --out "$out/tiny-ov-video" --seconds-a "${SECONDS_A:-60}" --seconds-b "${SECONDS_B:-240}" --batch 64 \
           ${TRAIN_ARGS:-} 2>&1 \
           | tr '\r' '\n' | awk 'NR % 25 == 0 || !/it\/s|s\/it/' ;;
  train) timeout -s TERM "${TRAIN_SECONDS:-340}" python3 -m tokenprune.eval.research.train --device "${DEVICE:-cuda}" ${TRAIN_ARGS:-} \
           --out "$out/tiny-llava-vqa" --seconds-a "${SECONDS_A:-60}" --seconds-b "${SECONDS_B:-210}" --batch 256 2>&1 \
           | tr '\r' '\n' | awk 'NR % 25 == 0 || !/it\/s|s\/it/' ;;
  fidelity) timeout -s TERM "${FIDELITY_SECONDS:-150}" python3 -m tokenprune.eval.synthetic.fidelity --out "$out" \
           ${FIDELITY_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v 'it\]$' ;;
  probe-video) timeout -s TERM 120 python3 -m tokenprune.eval.research.probe_video ${PROBE_ARGS:-} 2>"$out/probe_video.err" \
           | tee "$out/probe_video.json" ;;
  fidelity-video) timeout -s TERM "${FIDELITY_SECONDS:-150}" python3 -m tokenprune.eval.synthetic.fidelity_video \
           --out "$out" ${FIDELITY_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v 'it\]$' ;;
esac
