#!/usr/bin/env bash
# Per-layer k on CUDA in one command (docs/backends.md, "The CUDA check").
#
#   here:             .venv/bin/python bench/gpu_check_prepare.py      (writes out/gpu-check/, ~20 MiB)
#   on the GPU box:   bash bench/gpu_check.sh                          (with out/gpu-check carried along)
#   on this CPU:      bash bench/gpu_check.sh --cpu                    (the same steps, a CPU build: make gpu-check-prepare)
#
# Builds the carried, trimmed, patched llama.cpp (CUDA for sm_90 only, $JOBS jobs; or the CPU), then
#  1. fidelity: lexi-fidelity runs every configuration of configs.tsv (full, uniform and LExI at 0.75 / 0.5,
#     the file's default) with every layer on the GPU, with every layer's experts on the CPU (--n-cpu-moe),
#     with half of them there (the split placement) and with -ot exps=CPU; each run must run the configuration's
#     per-layer counts (as loaded and as the graph's ffn_moe_topk tensors show them) and its logits must match
#     the CPU reference shipped with it (mean KL under the configuration's bound, top-1 >= MIN_TOP1);
#  2. speed: llama-bench (prefill NP, decode NG tokens, REPS repetitions) for full / uniform / LExI with all
#     layers on the GPU and with the experts on the CPU (--n-cpu-moe).
# Results under $OUT (default out/gpu-check/results-MODE): summary.md, fidelity.jsonl, bench.jsonl,
# env.txt, build.log. Exit status 0 only if the build and every fidelity run passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
PACK=${LEXI_GPU_PACK:-$ROOT/out/gpu-check}
OUT=${OUT:-$PACK/results-$MODE}
WORK=${LEXI_GPU_WORK:-/tmp/lexi-gpu-check-$MODE}
# the CUDA build stops after BUILD_TIMEOUT s so that what it logged comes back inside a 10-minute call; a
# second call on the still-warm machine resumes it (the unpacked sources keep their times, so ninja keeps
# what was built)
if [ $MODE = cuda ]; then JOBS=${JOBS:-16}; NP=${NP:-512}; NG=${NG:-128}; REPS=${REPS:-5}; MIN_TOP1=${MIN_TOP1:-0.95}
     BUILD_TIMEOUT=${BUILD_TIMEOUT:-450}
else JOBS=${JOBS:-2}; NP=${NP:-64}; NG=${NG:-16}; REPS=${REPS:-1}; MIN_TOP1=${MIN_TOP1:-1.0}
     BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}; fi
THREADS=${THREADS:-$(nproc)}
mkdir -p "$OUT" "$WORK"
: >"$OUT/fidelity.jsonl"; : >"$OUT/bench.jsonl"; : >"$OUT/summary.md"
T0=$SECONDS
say() { echo "[gpu_check $MODE +$((SECONDS - T0))s] $*" | tee -a "$OUT/summary.md"; }
for f in llama.cpp.tar.gz model.gguf configs.tsv; do
    [ -f "$PACK/$f" ] || { say "missing $PACK/$f: run .venv/bin/python bench/gpu_check_prepare.py first (and carry out/gpu-check)"; exit 2; }
done

{ echo "mode: $MODE"; date -u; uname -a; grep -m1 'model name' /proc/cpuinfo; nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2; cmake --version | head -1; } >"$OUT/env.txt" 2>&1

# --- build -------------------------------------------------------------------------------------------
rm -rf "$WORK/llama.cpp" && tar xzf "$PACK/llama.cpp.tar.gz" -C "$WORK" || { say "cannot unpack the source"; exit 2; }
CMAKE=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
       # the runtime's own CPU flags (lexi_gguf/runtime/build.py): no AMX matmul path, it crashes (docs/backends.md)
       "-DCMAKE_C_FLAGS=-U__AMX_INT8__" "-DCMAKE_CXX_FLAGS=-U__AMX_INT8__")
[ $MODE = cuda ] && CMAKE+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_NCCL=OFF
                            "-DGGML_CUDA_FA=${CUDA_FA:-OFF}")
command -v ninja >/dev/null && CMAKE+=(-G Ninja)
B="$WORK/build"
say "building ($MODE, $JOBS jobs)"
if ! { cmake -S "$WORK/llama.cpp" -B "$B" "${CMAKE[@]}" &&
       timeout "$BUILD_TIMEOUT" cmake --build "$B" -j "$JOBS" --target llama-bench lexi-fidelity llama-perplexity; } >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; say "BUILD FAILED (build.log)"; exit 1
fi
say "built"
BIN="$B/bin"

# --- 1. fidelity: per-layer counts and logits against the CPU reference ----------------------------------
N_LAYER=$(awk -F'\t' 'NR == 1 { print split($3, a, ",") }' "$PACK/configs.tsv")
PLACEMENTS=("gpu|-ngl 99" "experts-cpu|-ngl 99 --n-cpu-moe 99" "split|-ngl 99 --n-cpu-moe $((N_LAYER / 2))"
            "ot-exps-cpu|-ngl 99 -ot-exps-cpu")
fail=0
while IFS=$'\t' read -r label ov counts ref max_kl; do
    [ "$ov" = - ] && ov=""
    for p in "${PLACEMENTS[@]}"; do
        name=${p%%|*}; flags=${p#*|}
        # shellcheck disable=SC2086  # ov and flags are lists of arguments
        line=$("$BIN/lexi-fidelity" -m "$PACK/model.gguf" --ref "$PACK/$ref" --label "$label/$name" -t "$THREADS" \
               $flags $ov --expect-counts "$counts" --max-kl "$max_kl" --min-top1 "$MIN_TOP1" 2>>"$OUT/fidelity.log" </dev/null)
        rc=$?
        [ -n "$line" ] || line="{\"label\": \"$label/$name\", \"ok\": false, \"error\": \"exit $rc (fidelity.log)\"}"
        echo "$line" >>"$OUT/fidelity.jsonl"
        [ $rc -eq 0 ] || { fail=1; say "FIDELITY FAILED: $line"; }
    done
done <"$PACK/configs.tsv"
say "fidelity: $(grep -c '"ok": true' "$OUT/fidelity.jsonl") of $(wc -l <"$OUT/fidelity.jsonl") runs passed"

# --- 2. speed: llama-bench, full / uniform / LExI, all layers on the GPU and experts on the CPU ---------------
while IFS=$'\t' read -r label ov counts ref max_kl; do
    [ "$label" = default ] && continue
    [ "$ov" = - ] && ov=""
    for p in "gpu|-ngl 99" "experts-cpu|-ngl 99 -ncmoe 99"; do
        name=${p%%|*}; flags=${p#*|}
        # shellcheck disable=SC2086
        "$BIN/llama-bench" -m "$PACK/model.gguf" -p "$NP" -n "$NG" -r "$REPS" -t "$THREADS" $flags $ov -o jsonl \
            2>>"$OUT/bench.log" </dev/null | while read -r r; do
            echo "{\"label\": \"$label\", \"placement\": \"$name\", \"counts\": \"$counts\", \"llama_bench\": $r}"
        done >>"$OUT/bench.jsonl" || say "llama-bench failed: $label/$name (bench.log)"
    done
done <"$PACK/configs.tsv"
python3 "$ROOT/bench/gpu_check/summary.py" "$OUT" >>"$OUT/summary.md" 2>&1 || say "summary.py failed"
say "done; results in $OUT"
exit $fail
