"""The local GPU devices ggml registered (CUDA, Metal, Vulkan; RPC servers are runtime.rpc's), for
`doctor`, and what a load says once when options meant for weights held here meet offloaded layers.

Vulkan on a machine without a GPU: Mesa's lavapipe is a Vulkan device of type CPU, and ggml's Vulkan
backend skips CPU-type devices unless they are named: GGML_VK_VISIBLE_DEVICES=0 (set before the first
load) makes it ggml's Vulkan0 (docs/backends.md)."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from .options import LoadOptions

# ggml_backend_dev_type (ggml-backend.h)
DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
_said: set[tuple[str, str, str]] = set()


def _api(lib):
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    for name, res, args in (("ggml_backend_dev_count", sz, []), ("ggml_backend_dev_get", vp, [sz]),
                            ("ggml_backend_dev_type", ctypes.c_int, [vp]), ("ggml_backend_dev_backend_reg", vp, [vp]),
                            ("ggml_backend_reg_name", cp, [vp]), ("ggml_backend_dev_name", cp, [vp]),
                            ("ggml_backend_dev_description", cp, [vp]),
                            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def gpu_devices() -> list[dict]:
    """ggml's local GPU / integrated GPU devices in registry order: backend (Vulkan, CUDA, Metal), name
    (Vulkan0, CUDA0, ...), description (the driver's device name: "llvmpipe (LLVM 15.0.6, 256 bits)"
    for lavapipe), type, and memory in bytes. [] on a CPU build."""
    from .binding import libggml
    lib = _api(libggml())
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "other")
        backend = (lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) or b"").decode()
        if kind not in ("gpu", "igpu") or backend == "RPC":
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"backend": backend, "name": (lib.ggml_backend_dev_name(dev) or b"").decode(),
                    "description": (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                    "type": kind, "memory_total": total.value, "memory_free": free.value})
    return out


def describe(devs: list[dict]) -> str:
    return ", ".join(f"{d['name']} ({d['description']})" for d in devs)


def vulkan_hint(backend: str | None, devs: list[dict]) -> str | None:
    """Why a Vulkan build may show no device, when it shows none: lavapipe (and any CPU-type Vulkan
    device) is skipped unless GGML_VK_VISIBLE_DEVICES names it."""
    if backend != "vulkan" or devs:
        return None
    if os.environ.get("GGML_VK_VISIBLE_DEVICES") is None:
        return ("no Vulkan GPU found; ggml skips CPU-type Vulkan devices (lavapipe): set GGML_VK_VISIBLE_DEVICES=0 "
                "to use one (`vulkaninfo --summary` lists the devices)")
    return ("no Vulkan device found: is a Vulkan driver installed (mesa-vulkan-drivers, or the GPU vendor's)? "
            "`vulkaninfo --summary` lists what the loader sees")


def _say_once(path: Path, what: str, line: str) -> None:
    key = (str(path), what, line)
    if key not in _said:
        _said.add(key)
        print(line, file=sys.stderr, flush=True)


def say_offload_notes(path: Path, opts: LoadOptions) -> None:
    """One line each (once per file and option) where an option about weights held here meets layers
    that are not: expert prefetch (madvise on this machine's mapped file) does nothing for layers on
    RPC servers or GPUs (the patch skips weights outside host memory); an explicit --repack concerns only
    the weights kept on the CPU. (--expert-cache with offloaded layers is refused by LoadOptions.)"""
    if opts.n_gpu_layers == 0 or (opts.prefetch == "off" and opts.repack == "auto"):
        return
    devs = [] if opts.rpc else gpu_devices()
    if not opts.rpc and not devs:
        return                      # a CPU build: every layer stays here, whatever -ngl says
    from ..gguf.reader import model_info
    n_layer = model_info(path).n_main
    remote = n_layer if opts.n_gpu_layers < 0 else min(opts.n_gpu_layers, n_layer)
    if opts.prefetch != "off" and opts.rpc:
        _say_once(path, "prefetch", f"lexi-gguf: prefetch: {remote} of {n_layer} layers are on RPC servers and are "
                  f"not prefetched (their experts live in the servers' memory); the {n_layer - remote} layers held "
                  "here are")
    elif opts.prefetch != "off":
        _say_once(path, "prefetch", f"lexi-gguf: prefetch: {remote} of {n_layer} layers are on {describe(devs)} and "
                  "are not prefetched (their experts live in the device's memory); "
                  + (f"it acts on the {n_layer - remote} held here" if remote < n_layer else "it has nothing to do"))
    if opts.repack != "auto" and not opts.rpc:
        _say_once(path, "repack", f"lexi-gguf: --repack {opts.repack}: {remote} of {n_layer} layers are on "
                  f"{describe(devs)}, in the device's own layouts; it applies to the weights kept on the CPU "
                  f"({n_layer - remote} of {n_layer} layers, and the token embeddings)")
