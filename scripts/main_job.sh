#!/usr/bin/env bash
# The main job, on a default the project builds itself (no download, nothing
# from ../shared): build and briefly train a small Llama on synthetic stories,
# quantize it with GPTQ to W4A16 and W8A8 (native format), serve each with
# `vllm serve`, and evaluate fp vs quantized with lm-eval on held-out text.
# Then the multimodal step: build and train the tiny VLM (demo-vlm), train a
# vision-aware EAGLE-3 drafter on its train.jsonl, serve the VLM with it in
# vLLM (K=3) on held-out images and print the acceptance.
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

if [ ! -d "$WORK/vlm" ]; then
    "$BIN/vllm-plugins" demo-vlm --out "$WORK/vlm"
fi
if [ ! -d "$WORK/vlm-drafter" ]; then
    "$BIN/vllm-plugins" train-drafter --target "$WORK/vlm" --data "$WORK/vlm/train.jsonl" \
        --out "$WORK/vlm-drafter" --image-inputs embeds
fi
"$BIN/python" scripts/bench_spec_mm.py --work "$WORK/spec-mm" --vlm "$WORK/vlm" \
    --vision-drafter "$WORK/vlm-drafter" --configs vision --num-prompts 40
