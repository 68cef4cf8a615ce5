"""The machine a number or a bug report comes from: CPU model and class, the SIMD/AMX features the
kernel reports, and which ggml CPU paths the installed runtime has compiled in.

CPU classes matter here because ggml picks different matmul kernels per class (and its AMX path
crashes, see docs/backends.md): "amx" (AVX512 + AMX, e.g. Sapphire Rapids), "avx512", "avx2".
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path

# /proc/cpuinfo flag names of the features ggml's x86 kernels branch on
X86_FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    return platform.processor() or platform.machine()


def cpu_class(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    for name, need in (("amx", "amx_int8"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if need in flags:
            return name
    return platform.machine()


def cpu_features() -> dict[str, bool]:
    flags = cpu_flags()
    return {f: f in flags for f in X86_FEATURES} if platform.machine() in ("x86_64", "AMD64") else {}


def flags_hash(flags: set[str] | None = None) -> str:
    """6 hex digits of the CPU's feature flags: two machines that report the same model string (a
    virtual machine often says only "AMD EPYC" or "Intel Xeon Processor") but expose other features
    get other ids."""
    flags = cpu_flags() if flags is None else flags
    return hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:6]


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"@.*$| with .*$", "", text).strip()
    text = re.sub(r"\b(cpu|processor)\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:32] or "cpu"


def machine_id(model: str | None = None, cls: str | None = None, cores: int | None = None,
               flags: set[str] | None = None) -> str:
    """The name a result file carries: CPU model, class, cores and the flags hash, e.g.
    `amd-epyc-avx2-2c-3f09a1`; no two machines that differ in any of those share it."""
    flags = cpu_flags() if flags is None else flags
    model = cpu_model() if model is None else model
    cls = cpu_class(flags) if cls is None else cls
    cores = os.cpu_count() if cores is None else cores
    return f"{_slug(model)}-{cls}-{cores}c-{flags_hash(flags)}"


def machine() -> dict:
    """What every saved benchmark result records about where it ran (`id`: machine_id())."""
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    flags = cpu_flags()
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_class": cpu_class(flags), "cores": os.cpu_count(), "memory_gib": mem,
            "python": platform.python_version(), "cpu_flags_hash": flags_hash(flags), "id": machine_id(flags=flags)}


def ggml_system_info() -> dict[str, str]:
    """ggml's own list of the CPU paths compiled into the runtime ("AVX512 = 1 | AMX_INT8 = 1 | ...")."""
    import llama_cpp
    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    out: dict[str, str] = {}
    for part in text.replace("\n", "|").split("|"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().split(":")[-1].strip()] = v.strip()
    return out


def amx_matmul_compiled(info: dict[str, str] | None = None) -> bool:
    """ggml lists AMX_INT8 exactly when its AMX matmul path (and AMX buffer type) is compiled in."""
    info = ggml_system_info() if info is None else info
    return info.get("AMX_INT8") == "1"
