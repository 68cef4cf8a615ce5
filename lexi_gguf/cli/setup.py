"""`build-runtime` and `doctor`: the patched runtime and what it was built with."""
from __future__ import annotations

import json

from .. import LexiError


def cmd_build_runtime(args) -> None:
    from ..runtime.build import build_runtime
    build_runtime(args.backend, args.jobs, tools=not args.no_tools)


def cmd_doctor(args) -> None:
    from ..runtime.llama import doctor
    d = doctor()
    print(json.dumps(d, indent=2))
    c = d["cpu"]
    have = [f for f, on in c["features"].items() if on]
    print(f"cpu: {c['model']} (class {c['class']}; {' '.join(have) or 'no x86 SIMD flags'})")
    if d["ggml_cpu_paths"] is not None:
        paths = [k for k, v in d["ggml_cpu_paths"].items() if v == "1"]
        print(f"ggml CPU paths compiled in: {' '.join(paths)}")
        print(f"AMX matmul path: {'compiled in' if d['amx_matmul_compiled'] else 'not compiled in (docs/backends.md)'}")
    print(f"build flags: {' '.join(d['build_flags'] or []) or 'unknown (runtime not built by lexi-gguf)'}")
    if "rpc" in d:
        tools = d["tools"]
        print(f"RPC backend (--rpc): {'compiled in' if d['rpc'] else 'not compiled in: rebuild with `make setup`'}; "
              f"ggml-rpc-server: {tools['ggml-rpc-server'] or 'not built'}")
        print(f"llama-server (serve --engine llama-server): {tools['llama-server'] or 'built on first use'}")
    if "gpu_devices" in d:
        from ..runtime.devices import describe, vulkan_hint
        devs, backend = d["gpu_devices"], (d["runtime"] or {}).get("backend")
        shown = describe(devs) if devs else f"none ({backend or 'cpu'} build)"
        print(f"GPU devices (--n-gpu-layers): {shown}")
        hint = vulkan_hint(backend, devs)
        if hint:
            print(f"note: {hint}")
    if not d["patched"]:
        raise LexiError("the llama_cpp in use is not the lexi-patched build; run `make setup`")
    print("ok: the llama_cpp in use honours lexi.expert_used_count")


def register(sub) -> None:
    p = sub.add_parser("build-runtime", help="build the patched llama-cpp-python and llama.cpp tools (cached)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "metal", "vulkan"])
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--no-tools", action="store_true", help="skip llama-bench/llama-perplexity/llama-quantize")
    p.set_defaults(func=cmd_build_runtime)

    p = sub.add_parser("doctor", help="is the llama_cpp in use the lexi-patched build?")
    p.set_defaults(func=cmd_doctor)
