"""Where MoE expert weights live when layers are offloaded: llama.cpp's `--n-cpu-moe N` (the routed experts
of the first N layers stay in CPU memory, computed there) and `-ot PATTERN=BUFFER` (tensors whose name
matches PATTERN go to that buffer type: `exps=CPU` keeps every expert on the CPU). The rest of each
layer (attention, router, shared experts) goes where --n-gpu-layers puts it.

Per-layer k does not care where an expert lives: the counts are resolved in the graph (build_moe_ffn),
before the scheduler splits it between devices, so the split placement runs the same ffn_moe_topk
shapes (tests/test_moe_offload.py on the CPU; bench/gpu_check.sh on CUDA). Without offloaded layers the
overrides place nothing elsewhere (every weight is already on the CPU) but still take llama.cpp's buffer
override path; experts put in the plain CPU buffer are not repacked.

Used by runtime.llama.load (model params' tensor_buft_overrides, a NULL-terminated array kept alive on
the Llama) and by LoadOptions.tool_args (the same options for llama.cpp's tools).
"""
from __future__ import annotations

import ctypes
import re

from .. import LexiError

# common/common.h LLM_FFN_EXPS_REGEX: the routed experts' tensors (merged gate_up and chunked forms too)
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class BuftOverride(ctypes.Structure):     # llama.h struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def parse(spec: str) -> list[tuple[str, str]]:
    """`PATTERN=BUFFER[,PATTERN=BUFFER...]` (llama.cpp's -ot) as (pattern, buffer type name) pairs."""
    out = []
    for part in spec.split(","):
        pattern, eq, buft = part.partition("=")
        if not eq or not pattern or not buft:
            raise LexiError(f"--override-tensor {spec!r}: give PATTERN=BUFFER (e.g. exps=CPU), comma-separated")
        try:
            re.compile(pattern)
        except re.error as e:
            raise LexiError(f"--override-tensor {spec!r}: {pattern!r} is not a regular expression ({e})") from None
        out.append((pattern, buft))
    return out


def overrides(cpu_moe: int, override_tensor: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (pattern, buffer type) a load asks for, in llama.cpp's order: -ot first, then --n-cpu-moe."""
    out = [p for spec in override_tensor for p in parse(spec)]
    return out + [(f"blk\\.{i}{EXPS_REGEX}", "CPU") for i in range(cpu_moe)]


def buffer_types() -> dict[str, int]:
    """The buffer types of the devices ggml registered, by name (CPU, CUDA0, Vulkan0, RPC servers ...)."""
    from .binding import libggml
    lib = libggml()
    vp = ctypes.c_void_p
    for name, res, args in (("ggml_backend_dev_count", ctypes.c_size_t, []),
                            ("ggml_backend_dev_get", vp, [ctypes.c_size_t]),
                            ("ggml_backend_dev_buffer_type", vp, [vp]), ("ggml_backend_buft_name", ctypes.c_char_p, [vp])):
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    out = {}
    for i in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(i))
        if buft:
            out[lib.ggml_backend_buft_name(buft).decode()] = buft
    return out


def model_fields(cpu_moe: int, override_tensor: tuple[str, ...]) -> tuple[dict, object]:
    """The model params fields for these placements ({} when there are none) and the ctypes array they
    point to (keep it alive as long as the model)."""
    pairs = overrides(cpu_moe, override_tensor)
    if not pairs:
        return {}, None
    known = buffer_types()
    arr = (BuftOverride * (len(pairs) + 1))()
    for i, (pattern, name) in enumerate(pairs):
        if name not in known:
            raise LexiError(f"--override-tensor {pattern}={name}: this runtime has no buffer type {name!r}; "
                            f"it has {', '.join(sorted(known))}")
        arr[i].pattern, arr[i].buft = pattern.encode(), known[name]
    return {"tensor_buft_overrides": ctypes.addressof(arr)}, arr


def tool_args(cpu_moe: int, override_tensor: tuple[str, ...]) -> list[str]:
    """The same placements for a llama.cpp tool run as a child (llama-perplexity, llama-server)."""
    out = []
    for spec in override_tensor:
        out += ["-ot", spec]
    return out + (["--n-cpu-moe", str(cpu_moe)] if cpu_moe else [])
