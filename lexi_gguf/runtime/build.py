"""Build the patched runtime: llama-cpp-python (pinned sdist + our llama.cpp patch) and the
llama.cpp tools (llama-bench, llama-perplexity, llama-quantize, ggml-rpc-server, ...) from the same
patched tree; llama-server on first use (build_on_demand).

Wheels and tools are cached by (version, patch hash, backend), so a second set-up only reinstalls.
The cache lives in $LEXI_GGUF_CACHE (default ~/.cache/lexi-gguf).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .. import LexiError

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO_ROOT / "patches"
PIN_FILE = PATCH_DIR / "pin.toml"
# llama.cpp's own tools the project runs: bench, eval, convert --quant, split sets and importance matrices,
# the RPC server that lends a machine's backend to a client (`--rpc`)
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-gguf-split", "llama-imatrix", "ggml-rpc-server")
# built the first time they are asked for (same tree, same cache): llama-server and its multimodal and
# HTTP libraries take ~3 min on 2 cores, which a set-up that does not serve many clients should not pay
ON_DEMAND_TOOLS = ("llama-server",)
# every backend is built with ggml's RPC client (layers on other machines: docs/rpc.md)
COMMON_CMAKE = ["-DGGML_RPC=ON"]
BACKEND_CMAKE = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"],
    # any Vulkan 1.2 device: AMD / Intel / NVIDIA GPUs, and Mesa's lavapipe, a software device on the
    # CPU (the one the tests run on here: docs/backends.md). Needs the system packages in runtime.syspkgs
    "vulkan": ["-DGGML_VULKAN=ON"],
}
# patches one backend's build needs on some systems (patches/backend/), applied after pin.toml's lexi patches:
# each a no-op where it is not needed, none touching the lexi patches' code; part of that backend's cache key,
# not of the patch hash (the CPU runtime's key is unchanged by them)
BACKEND_PATCHES = {"vulkan": ("backend/ggml-vulkan-old-headers.patch",)}
# ggml's AMX matmul path (ggml-cpu/amx/, used for quantized and F16 weights in batches >= 16 when a
# native build lands on an AMX CPU) crashes (SIGILL/SIGSEGV in ldtilecfg/tilezero; upstream #20824).
# Undefining the one macro that gates it keeps every other native kernel (AVX512, VNNI, repack): the
# -U is applied after the compiler's -march=native predefines, whatever the flag order. See
# docs/backends.md; LEXI_GGUF_AMX=1 builds the upstream AMX path back in.
NO_AMX_FLAGS = "-U__AMX_INT8__"
NO_AMX_CMAKE = [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
# where the venv records which cached runtime it uses (read by lexi_gguf.runtime)
RUNTIME_RECORD = Path(sys.prefix) / "share" / "lexi-gguf" / "runtime.json"


@dataclass(frozen=True)
class Pin:
    version: str
    sdist_sha256: str
    llama_cpp_commit: str
    patches: tuple[Path, ...]

    @property
    def patch_hash(self) -> str:
        h = hashlib.sha256()
        for p in self.patches:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        return h.hexdigest()[:12]


def read_pin() -> Pin:
    data = tomllib.loads(PIN_FILE.read_text())
    lcp = data["llama-cpp-python"]
    return Pin(lcp["version"], lcp["sdist_sha256"], lcp["llama_cpp_commit"],
               tuple(PATCH_DIR / f for f in data["patch"]["files"]))


def cache_root() -> Path:
    return Path(os.environ.get("LEXI_GGUF_CACHE", Path.home() / ".cache" / "lexi-gguf"))


def amx_enabled() -> bool:
    return os.environ.get("LEXI_GGUF_AMX", "") == "1"


def cmake_args(backend: str) -> list[str]:
    """CMake options of both builds (wheel and tools): backend + CPU build flags."""
    return [*BACKEND_CMAKE[backend], *COMMON_CMAKE, *([] if amx_enabled() else NO_AMX_CMAKE)]


def backend_patches(backend: str) -> tuple[Path, ...]:
    return tuple(PATCH_DIR / p for p in BACKEND_PATCHES.get(backend, ()))


def runtime_dir(pin: Pin, backend: str) -> Path:
    # the build flags are part of the key: a cached runtime built with other flags is not reused
    key = " ".join(cmake_args(backend)) + "".join(p.read_text() for p in backend_patches(backend))
    flags = hashlib.sha256(key.encode()).hexdigest()[:6]
    return cache_root() / "runtime" / f"llama-cpp-python-{pin.version}-{pin.patch_hash}-{backend}-{flags}"


def _log(msg: str) -> None:
    print(f"[build-runtime] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(pin: Pin, dest: Path) -> Path:
    """Download the pinned sdist from the package index (or take $LEXI_GGUF_SDIST) and check its hash."""
    name = f"llama_cpp_python-{pin.version}.tar.gz"
    target = dest / name
    local = os.environ.get("LEXI_GGUF_SDIST")
    if not target.exists():
        dest.mkdir(parents=True, exist_ok=True)
        if local:
            shutil.copy(local, target)
        else:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={pin.version}", "-d", dest])
    got = _sha256(target)
    if got != pin.sdist_sha256:
        target.unlink()
        raise LexiError(f"{name} has sha256 {got}, but patches/pin.toml pins {pin.sdist_sha256}; "
                        "the download is corrupt or the index serves another file")
    return target


def prepare_source(pin: Pin, rdir: Path, extra: tuple[Path, ...] = ()) -> Path:
    """Extract the sdist and apply our patches (then extra: a backend's); returns the llama-cpp-python source dir."""
    src = rdir / "src"
    marker = src / ".lexi-patched"
    if marker.exists():
        return src / f"llama_cpp_python-{pin.version}"
    sdist = fetch_sdist(pin, cache_root() / "sdist")
    tmp = Path(tempfile.mkdtemp(dir=rdir, prefix="src-"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    tree = tmp / f"llama_cpp_python-{pin.version}"
    for p in (*pin.patches, *extra):
        _run(["patch", "-p1", "--forward", "--batch", "-d", tree / "vendor" / "llama.cpp", "-i", p])
    (tmp / ".lexi-patched").write_text(pin.patch_hash)
    if src.exists():
        shutil.rmtree(src)
    tmp.rename(src)
    return src / f"llama_cpp_python-{pin.version}"


def build_wheel(tree: Path, rdir: Path, backend: str, jobs: int) -> Path:
    wheels = rdir / "wheel"
    found = sorted(wheels.glob("llama_cpp_python-*.whl")) if wheels.exists() else []
    if found:
        return found[-1]
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(["-DLLAVA_BUILD=OFF", *cmake_args(backend), env.get("CMAKE_ARGS", "")]).strip()
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    tmp = Path(tempfile.mkdtemp(dir=rdir, prefix="wheel-"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp,
          "-Cbuild-dir=" + str(rdir / "build-wheel"), tree], env=env)
    if wheels.exists():
        shutil.rmtree(wheels)
    tmp.rename(wheels)
    return sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]


def build_tools(tree: Path, rdir: Path, backend: str, jobs: int) -> Path:
    """The TOOLS, built in the wheel's own build tree: that build
    already compiled ggml and libllama (shared, same flags, same patches), so adding the tools' targets
    there compiles their few sources and links them to the very libllama the Python runtime loads
    (measured on 2 cores: ~25 s, where a second full llama.cpp build took ~5 min). They and the shared
    libraries they need are copied to bin/ and find each other through RUNPATH $ORIGIN."""
    bindir = rdir / "bin"
    if all((bindir / t).exists() for t in TOOLS):
        return bindir
    bdir = rdir / "build-wheel"
    # llama-server without its web UI: the prebuilt UI would be downloaded at build time (no network
    # here) and the npm build needs node; the HTTP API is what lexi-gguf serves
    _run(["cmake", "-S", tree, "-B", bdir, "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
          "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"])
    _run(["cmake", "--build", bdir, "-j", str(jobs), "--target", *TOOLS])
    tmp = Path(tempfile.mkdtemp(dir=rdir, prefix="bin-"))
    for f in [*TOOLS, *(p.name for p in (bdir / "bin").glob("lib*.so*"))]:
        shutil.copy2(bdir / "bin" / f, tmp / f, follow_symlinks=False)
    if bindir.exists():
        shutil.rmtree(bindir)
    tmp.rename(bindir)
    return bindir


def build_on_demand(name: str, bindir: Path, jobs: int | None = None) -> Path:
    """An ON_DEMAND_TOOLS binary, built once in the cached runtime's build tree (configured for it by
    build_tools) and copied into its bin/ beside the libraries it links; a lock keeps two processes
    from building it at once."""
    import fcntl
    if name not in ON_DEMAND_TOOLS:
        raise LexiError(f"{name} is not one of the tools built on demand ({', '.join(ON_DEMAND_TOOLS)})")
    bdir = bindir.parent / "build-wheel"
    if not (bdir / "CMakeCache.txt").exists():
        raise LexiError(f"the runtime's build tree {bdir} is gone; rebuild with `lexi-gguf build-runtime`")
    with open(bindir.parent / ".on-demand.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (bindir / name).exists():
            return bindir / name
        _log(f"building {name} (once; ~3 min on 2 cores)")
        t0 = time.time()
        _run(["cmake", "--build", bdir, "-j", str(jobs or os.cpu_count() or 2), "--target", name],
             stdout=sys.stderr)
        for lib in (bdir / "bin").glob("lib*.so*"):
            if not (bindir / lib.name).exists():
                shutil.copy2(lib, bindir / lib.name, follow_symlinks=False)
        tmp = bindir / f".{name}.tmp"
        shutil.copy2(bdir / "bin" / name, tmp)
        tmp.rename(bindir / name)    # the binary appears last, complete
        _log(f"{name} ready in {time.time() - t0:.0f} s")
    return bindir / name


def runtime_record() -> dict | None:
    """What build_runtime recorded about the runtime this environment uses; None before a set-up."""
    return json.loads(RUNTIME_RECORD.read_text()) if RUNTIME_RECORD.exists() else None


def llama_cpp_dir() -> Path:
    """The patched llama.cpp source tree (converter, gguf-py, vocab files) of the installed runtime."""
    if os.environ.get("LEXI_GGUF_LLAMA_CPP_DIR"):
        return Path(os.environ["LEXI_GGUF_LLAMA_CPP_DIR"])
    rec = runtime_record()
    if not rec or not Path(rec["llama_cpp_dir"]).exists():
        raise LexiError("the patched llama.cpp tree is not set up; run `make setup` or `lexi-gguf build-runtime`")
    return Path(rec["llama_cpp_dir"])


def tool(name: str) -> Path:
    """Path of llama-bench / llama-perplexity / llama-quantize / ggml-rpc-server ... built from the patched
    tree (an ON_DEMAND_TOOLS one is built here the first time it is asked for)."""
    rec = runtime_record()
    if rec and rec.get("bin_dir") and name in ON_DEMAND_TOOLS and not (Path(rec["bin_dir"]) / name).exists():
        return build_on_demand(name, Path(rec["bin_dir"]))
    if not rec or not rec.get("bin_dir") or not (Path(rec["bin_dir"]) / name).exists():
        raise LexiError(f"{name} is not built; run `make setup` or `lexi-gguf build-runtime`")
    return Path(rec["bin_dir"]) / name


def build_runtime(backend: str = "cpu", jobs: int | None = None, tools: bool = True) -> dict:
    """Build (or take from cache) the patched runtime and install it into this Python environment."""
    if backend not in BACKEND_CMAKE:
        raise LexiError(f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_CMAKE)}")
    for exe in ("patch", "cmake"):
        if not shutil.which(exe):
            raise LexiError(f"'{exe}' is not on PATH; install it (apt-get install {exe}) and retry")
    from .syspkgs import ensure
    ensure(backend, log=_log)                 # e.g. Vulkan's headers and shader compiler (installed if root + apt)
    pin = read_pin()
    jobs = jobs or os.cpu_count() or 2
    rdir = runtime_dir(pin, backend)
    rdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tree = prepare_source(pin, rdir, backend_patches(backend))
    if tools and not all((rdir / "bin" / t).exists() for t in TOOLS) and not (rdir / "build-wheel" / "CMakeCache.txt").exists():
        shutil.rmtree(rdir / "wheel", ignore_errors=True)    # the tools build in the wheel's build tree: redo it
    wheel = build_wheel(tree, rdir, backend, jobs)
    bindir = build_tools(tree, rdir, backend, jobs) if tools else None
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel])
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
          tree / "vendor" / "llama.cpp" / "gguf-py"])
    record = {
        "version": pin.version, "patch_hash": pin.patch_hash, "backend": backend,
        "llama_cpp_commit": pin.llama_cpp_commit, "wheel": str(wheel),
        "llama_cpp_dir": str(tree / "vendor" / "llama.cpp"),
        "bin_dir": str(bindir) if bindir else None,
        "cmake_args": cmake_args(backend), "amx_matmul": amx_enabled(),
    }
    RUNTIME_RECORD.parent.mkdir(parents=True, exist_ok=True)
    RUNTIME_RECORD.write_text(json.dumps(record, indent=2))
    _log(f"runtime ready in {time.time() - t0:.0f} s: {rdir}")
    return record
