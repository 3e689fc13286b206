#!/usr/bin/env bash
# Every compression command of docs/compression.md on one model, each result measured with eval ppl.
#   bash examples/compression.sh [MODEL] [OUT]
# MODEL defaults to the tiny model the other examples use (built if missing); OUT to runs/compression.
# The calibration and evaluation text is examples/data/pretrain.jsonl (a real run holds out its evaluation text).
set -euo pipefail
MODEL=${1:-models/tiny-llama}
OUT=${2:-runs/compression}
TEXT=examples/data/pretrain.jsonl
TUNELAB=${TUNELAB:-tunelab}
CAL=(--calibration "$TEXT" --samples 16 --length 64)

[ -d "$MODEL" ] || $TUNELAB init-model tiny-llama "$MODEL"
measure() { echo "== $1"; $TUNELAB eval ppl --model "$1" --data "$TEXT" --kind text | sed -n '3,5p'; }

measure "$MODEL"
# pruning: 50% unstructured by activation-aware scores, 2:4 by magnitude, a quarter of the layers dropped
$TUNELAB prune --model "$MODEL" --out "$OUT/wanda50" --method wanda --sparsity 0.5 "${CAL[@]}"
$TUNELAB prune --model "$MODEL" --out "$OUT/magnitude-2of4" --method magnitude --pattern 2:4
$TUNELAB prune --model "$MODEL" --out "$OUT/drop25" --method layers --drop 0.25 "${CAL[@]}"
# quantization: 4-bit groups of 16 inputs (the tiny model's MLP width, 688, is 43 x 16), RTN and GPTQ; 8-bit
$TUNELAB quantize --model "$MODEL" --out "$OUT/int4-rtn" --bits 4 --group-size 16
$TUNELAB quantize --model "$MODEL" --out "$OUT/int4-gptq" --bits 4 --group-size 16 --method gptq "${CAL[@]}"
$TUNELAB quantize --model "$MODEL" --out "$OUT/int8" --bits 8 --granularity channel
# low rank: half of every layer's parameters, whitened by its inputs
$TUNELAB lowrank --model "$MODEL" --out "$OUT/svd-half" --ratio 0.5 --whiten "${CAL[@]}"
# averaging (in practice checkpoints of one run: --run RUN --last K); here the model and its pruned copy
$TUNELAB average --model "$MODEL" --model "$OUT/wanda50" --out "$OUT/mean"
for m in wanda50 magnitude-2of4 drop25 int4-rtn int4-gptq int8 svd-half mean; do measure "$OUT/$m"; done
