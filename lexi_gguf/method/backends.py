"""Which per-layer k each backend's MoE kernels run, and which they run fast, read from the pinned
llama.cpp (llama-cpp-python 0.3.36's vendor/llama.cpp, patches/pin.toml), so allocation can respect it.

KERNELS is the table (docs/backends.md renders it with `markdown()`): one row per kernel that a MoE
layer's k reaches, naming the file and symbol it was read from and the facts of that source it rests
on (`Fact`: a regular expression and what it must find). tests/test_backends.py reads those files out
of the pinned sdist and checks every fact, so a version bump that changes a kernel's k fails there.

What it means for allocation (`safe_k`, `--backend-safe`): only Metal refuses some k. Its mul_mm_id map
kernel is instantiated for METAL_K only and is taken for batches of 32+ tokens (prefill), where any
other k fails with "failed to compile pipeline" (llama.cpp #17603). CPU, CUDA and Vulkan run any k;
CUDA's prefill helper is specialised for CUDA_FAST_K (others take its generic loop) and its fused
expert sum covers 2 <= k <= 15.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import LexiError

METAL_K = frozenset({1, 2, 4, 5, 6, 8, 10, 16, 22})
CUDA_FAST_K = frozenset({2, 4, 6, 8, 10, 16, 32})
BACKENDS = ("cpu", "cuda", "metal", "vulkan")


@dataclass(frozen=True)
class Fact:
    """What a source file must say for a row to hold: `pattern` searched in `file` (a path under
    vendor/llama.cpp), and `expect`: with how="set", the set of integers its first group matches
    (every match, base 0: 0xffff reads); "first": the first match's groups as integers; "count": how many
    matches."""
    file: str
    pattern: str
    expect: object
    how: str = "set"


@dataclass(frozen=True)
class Kernel:
    backend: str
    kernel: str        # what runs
    when: str          # which batches / models take it
    k_runs: str        # which k it runs
    k_fast: str        # which k it runs on its specialised or fused path
    file: str
    symbol: str
    facts: tuple[Fact, ...]


CPU_C, REPACK = "ggml/src/ggml-cpu/ggml-cpu.c", "ggml/src/ggml-cpu/repack.cpp"
CUDA, MMID, TOPK = "ggml/src/ggml-cuda/ggml-cuda.cu", "ggml/src/ggml-cuda/mmid.cu", "ggml/src/ggml-cuda/topk-moe.cu"
METAL_MM, METAL_MV = "ggml/src/ggml-metal/kernels/mul_mm.metal", "ggml/src/ggml-metal/kernels/mul_mv.metal"
METAL_COMMON = "ggml/src/ggml-metal/ggml-metal-common.cpp"
VK, VK_TYPES = "ggml/src/ggml-vulkan/ggml-vulkan.cpp", "ggml/src/ggml-vulkan/ggml-vulkan-types.h"

KERNELS: tuple[Kernel, ...] = (
    Kernel("cpu", "mul_mat_id (vec-dot / sgemm chunks)", "every batch, weights not repacked", "any", "any",
           CPU_C, "ggml_compute_forward_mul_mat_id",
           (Fact(CPU_C, r"const int n_ids = ids->ne\[0\]; // n_expert_used", 1, "count"),
            Fact(CPU_C, r"switch \(n_ids\)", 0, "count"))),
    Kernel("cpu", "repacked mul_mat_id (Q4_0 / Q4_K / IQ4_NL ... interleaved)", "repacked weights (x86, ARM)", "any",
           "any", REPACK, "forward_mul_mat_id",
           (Fact(REPACK, r"const int n_ids = ids->ne\[0\]; // n_expert_used", 1, "count"),
            Fact(REPACK, r"switch \(n_ids\)", 0, "count"))),
    Kernel("cuda", "mul_mat_vec_q with ids (mmvq)", "decode: tokens <= get_mmvq_mmid_max_batch (quantized)", "any",
           "any (k is a stride)", CUDA, "ggml_cuda_mul_mat_id",
           (Fact(CUDA, r"if \(ne2 <= mmvq_mmid_max\) \{\s*ggml_cuda_mul_mat_vec_q\(ctx, src0, src1, ids, dst\)", 1,
                 "count"),)),
    Kernel("cuda", "mm_ids_helper (sorts tokens by expert for mmq / mmf)", "prefill: batches above the mmvq limit",
           "k < 1024", "2, 4, 6, 8, 10, 16, 32 (template instances; other k: the generic loop)", MMID,
           "ggml_cuda_launch_mm_ids_helper",
           (Fact(MMID, r"launch_mm_ids_helper<\s*(\d+)>\(ids", frozenset(CUDA_FAST_K | {0})),
            Fact(MMID, r"n_expert_used_var < \(1 << (\d+)\)", (10,), "first"))),
    Kernel("cuda", "fused MoE weighted sum (mul + views + adds)", "every batch", "any",
           "2..15 (MOE_WEIGHTED_REDUCTION_MAX_EXPERTS); k = 1 and k > 15: unfused ops", CUDA,
           "MOE_WEIGHTED_REDUCTION_MAX_EXPERTS",
           (Fact(CUDA, r"MOE_WEIGHTED_REDUCTION_MAX_EXPERTS = (\d+);", (15,), "first"),
            Fact(CUDA, r"if \(n_expert_used < (\d+) \|\| n_expert_used > MOE_WEIGHTED_REDUCTION_MAX_EXPERTS", (2,),
                 "first"))),
    Kernel("cuda", "fused top-k routing (topk_moe)", "n_expert a power of 2 up to 512, or 288 / 576", "any",
           "any (the fusion depends on n_expert, not k)", TOPK, "ggml_cuda_should_use_topk_moe",
           (Fact(TOPK, r"n_expert > (\d+)\) && n_expert != (\d+) && n_expert != (\d+)\)", (512, 288, 576), "first"),)),
    Kernel("metal", "mul_mm_id map kernel (kernel_mul_mm_id_map0)", "batches of 32+ tokens (prefill), ne00 >= 64",
           "1, 2, 4, 5, 6, 8, 10, 16, 22 only: other k fail to compile the pipeline", "the same", METAL_MM,
           "kernel_mul_mm_id_map0",
           (Fact(METAL_MM, r"host_name\(\"kernel_mul_mm_id_map0_ne20_(\d+)\"", frozenset(METAL_K)),
            Fact(METAL_COMMON, r"has_simdgroup_mm && ne00 >= (\d+) && ne21 >= (\d+);", (64, 32), "first"))),
    Kernel("metal", "mul_mv_id (kernel_mul_mv_id)", "batches under 32 tokens (decode)", "any", "any",
           METAL_MV, "kernel_mul_mv_id",
           (Fact(METAL_MV, r"host_name\(\"kernel_mul_mv_id_[^\"]*ne20", 0, "count"),)),
    Kernel("vulkan", "mul_mat_id (matrix shaders, row ids)", "batches (prefill)", "any",
           "k <= 0xffff with n_expert <= 1024 (row ids hoisted into one table)", VK, "ggml_vk_mul_mat_id_q_f16",
           (Fact(VK, r"hoist_row_ids = n_as <= (\d+) && nei0 <= (0x[0-9a-f]+)", (1024, 0xffff), "first"),)),
    Kernel("vulkan", "mul_mat_vec_id (one workgroup row per used expert)", "decode", "any", "any", VK,
           "ggml_vk_mul_mat_vec_id_q_f16",
           (Fact(VK, r"pc, \{ groups_x, \(uint32_t\)nei0, groups_z \}", 1, "count"),)),
    Kernel("vulkan", "fused top-k routing (topk_moe shader)", "n_expert <= 512", "any",
           "any (pipelines per n_expert, not k)", VK, "ggml_vk_can_fuse_topk_moe",
           (Fact(VK_TYPES, r"num_topk_moe_pipelines = (\d+);", (10,), "first"),
            Fact(VK, r"if \(n_expert > \(1 << \(num_topk_moe_pipelines-1\)\)\)", 1, "count"))),
)


def read_fact(text: str, fact: Fact):
    """What `fact.pattern` finds in text, in the form `fact.expect` has."""
    found = re.findall(fact.pattern, text)
    if fact.how == "count":
        return len(found)
    if fact.how == "set":
        return frozenset(int(x, 0) for x in found)
    m = re.search(fact.pattern, text)
    return tuple(int(x, 0) for x in m.groups()) if m else None


def safe_k(backend: str) -> frozenset[int] | None:
    """k values a backend's kernels run (prefill included); None = any k."""
    if backend == "metal":
        return METAL_K
    if backend in ("cpu", "cuda", "vulkan"):
        return None
    raise LexiError(f"unknown backend {backend!r}: {', '.join(BACKENDS)}")


def markdown() -> str:
    """KERNELS as the table docs/backends.md shows (tests/test_backends.py checks the page holds it)."""
    out = ["| backend | kernel | taken for | k it runs | k on its fast path | source (vendor/llama.cpp) |",
           "|---|---|---|---|---|---|"]
    for r in KERNELS:
        out.append(f"| {r.backend} | {r.kernel} | {r.when} | {r.k_runs} | {r.k_fast} | `{r.file}` `{r.symbol}` |")
    return "\n".join(out) + "\n"
