#!/usr/bin/env bash
# Build (or reinstall from cache) the patched llama-cpp-python + llama.cpp tools into .venv.
#   scripts/build_runtime.sh [cpu|cuda|metal]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
make -C "$root" setup BACKEND="${1:-cpu}"
exec "$root/.venv/bin/lexi-gguf" build-runtime --backend "${1:-cpu}"
