#!/usr/bin/env bash
# The main job, on a default the project builds itself (no download, nothing
# from ../shared): build and briefly train a small Llama on synthetic stories,
# quantize it with GPTQ to W4A16 and W8A8 (native format), serve each with
# `vllm serve`, and evaluate fp vs quantized with lm-eval on held-out text.
#
#   bash scripts/main_job.sh [WORKDIR]      # default: runs/main-job
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/main-job}
BIN=.venv/bin
mkdir -p "$WORK"

if [ ! -d "$WORK/fp" ]; then
    "$BIN/vllm-plugins" demo-model --out "$WORK/fp"
fi
for scheme in w4a16 w8a8; do
    "$BIN/vllm-plugins" quantize --model "$WORK/fp" --out "$WORK/$scheme" --scheme "$scheme" \
        --format native --method gptq --calib "$WORK/fp/calib.txt" --force
done
"$BIN/vllm-plugins" eval --text "$WORK/fp/heldout.txt" \
    --model fp="$WORK/fp" --model w4a16-gptq="$WORK/w4a16" --model w8a8-gptq="$WORK/w8a8" \
    --output "$WORK/eval.json"
