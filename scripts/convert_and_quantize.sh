#!/usr/bin/env bash
# Thin wrapper: HF checkpoint -> LExI GGUF, profiled, allocated, converted and quantized with the
# pinned llama.cpp's own converter and quantizer.
#   scripts/convert_and_quantize.sh MODEL_DIR OUT.gguf [BUDGET=0.75] [QUANT=Q4_K_M] [extra lexi-gguf convert flags]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR OUT.gguf [BUDGET=0.75] [QUANT=Q4_K_M] [extra flags]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
model="$1"; out="$2"; budget="${3:-0.75}"; quant="${4:-Q4_K_M}"
shift $(( $# < 4 ? $# : 4 ))
[ -x "$root/.venv/bin/lexi-gguf" ] || make -C "$root" setup
exec "$root/.venv/bin/lexi-gguf" convert "$model" -o "$out" --budget "$budget" --quant "$quant" "$@"
