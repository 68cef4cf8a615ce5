"""The patched llama.cpp at run time: load a GGUF through llama-cpp-python with the lexi settings,
turn loader failures into errors that carry llama.cpp's own message, and say whether the
`llama_cpp` in use is the patched build (doctor)."""
from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

from .. import LexiError
from ..gguf import keys
from .binding import import_llama_cpp, libllama, llama_params_with
# the runtime's record, llama.cpp tree and tools live in build (rpc needs them too); many callers
# import them from here
from .build import llama_cpp_dir, runtime_record, tool  # noqa: F401
from .options import PREFETCH_MODES, LoadOptions, merged

# the function of llama.h each patch (patches/pin.toml) exports: the runtime has a patch iff it has its symbol
PATCH_SYMBOLS = {
    "llama.cpp-per-layer-experts.patch": "llama_model_n_expert_active",
    "llama.cpp-lexi-budget-switch.patch": "llama_lexi_set_row",
    "llama.cpp-lexi-weight-norm.patch": "llama_model_lexi_weight_norm",
    "llama.cpp-lexi-expert-prefetch.patch": "llama_lexi_set_prefetch",
    "llama.cpp-lexi-expert-counts.patch": "llama_lexi_set_counts",
    "llama.cpp-lexi-routing-replay.patch": "llama_lexi_set_routing",
}


class ModelLoadError(LexiError):
    """llama.cpp refused the model; .loader_messages holds what its loader said."""

    def __init__(self, path, messages: list[str]):
        self.loader_messages = messages
        detail = "; ".join(m for m in messages if m) or "no message from llama.cpp"
        super().__init__(f"llama.cpp could not load {path}: {detail}")


_log_lock = threading.Lock()
_log_lines: list[tuple[int, str]] = []
_log_echo = False
_log_cb = None


def install_log_hook():
    """Route llama.cpp's log through us so a failed load can report the loader's words."""
    global _log_cb
    llama_cpp = import_llama_cpp()
    if _log_cb is not None:
        return

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        s = text.decode("utf-8", "replace")
        with _log_lock:
            _log_lines.append((level, s))
            del _log_lines[:-2000]
        if _log_echo:
            sys.stderr.write(s)

    _log_cb = cb  # keep a reference: ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


def clear_log() -> None:
    """Forget what llama.cpp logged so far (captured_log then holds only what comes next)."""
    with _log_lock:
        _log_lines.clear()


def captured_log() -> str:
    with _log_lock:
        return "".join(s for _, s in _log_lines)


def lexi_overrides(arch: str | None = None, *, lexi: bool = True, budget_index: int | None = None,
                   uniform_k: int | None = None, weight_norm: str | None = None) -> dict:
    """kv_overrides for llama-cpp-python: the stored lexi counts, a ladder row, or a uniform k; and
    how fewer experts than trained are weighted (renorm | base), whatever the file says."""
    kv: dict = {}
    if weight_norm is not None:
        if weight_norm not in keys.WEIGHT_NORMS:
            raise LexiError(f"unknown weight norm {weight_norm!r}: use {' or '.join(keys.WEIGHT_NORMS)}")
        kv[keys.WEIGHT_NORM] = weight_norm
    if not lexi or uniform_k is not None:
        kv[keys.ENABLE] = False
    if uniform_k is not None:
        if arch is None:
            raise LexiError("a uniform k override needs the model's architecture name")
        kv[keys.arch_expert_used_count(arch)] = int(uniform_k)
    if budget_index is not None and lexi and uniform_k is None:
        kv[keys.BUDGET_INDEX] = int(budget_index)
    return kv


def override_kv_args(kv: dict) -> list[str]:
    """kv overrides as llama.cpp's tools take them: `--override-kv KEY=TYPE:VALUE` per key."""
    out = []
    for key, v in kv.items():
        if isinstance(v, bool):
            val = f"bool:{str(v).lower()}"
        elif isinstance(v, int):
            val = f"int:{v}"
        elif isinstance(v, float):
            val = f"float:{v!r}"
        elif isinstance(v, str):
            val = f"str:{v}"
        else:
            raise LexiError(f"override {key}: llama.cpp's --override-kv takes one bool, int, float or string, not {v!r}")
        out += ["--override-kv", f"{key}={val}"]
    return out


def check_file(path: Path) -> None:
    """Before llama.cpp's loader gets a file: its structure (gguf.check: a malformed file is named by byte
    offset and field), a split set's shards (every one present, readable and of this set: the loader
    names neither a missing shard nor the first one) and the lexi keys (the contract, whole: also the
    keys the loader does not read). Each problem is one LexiError."""
    from ..gguf.reader import model_info
    model_info(path)


def load(path: str | Path, *, options: LoadOptions | None = None, kv_overrides: dict | None = None, n_ctx: int = 512,
         n_threads: int | None = None, n_gpu_layers: int | None = None, logits_all: bool = False, verbose: bool = False,
         seed: int = 0, n_batch: int = 512, eval_callback=None, prefetch: str | None = None, repack: str | None = None,
         **kw):
    """Open a GGUF with the patched llama-cpp-python; loader errors become ModelLoadError.

    options: where layers and weights go and how (runtime.options.LoadOptions: offloaded layers, RPC
    servers and their split, repacking, expert prefetch, threads); default: all here, on the CPU.
    n_threads, n_gpu_layers, prefetch, repack: the same fields of options, given one by one (a value
    given here wins over options). The RPC servers the options name are registered with ggml on the
    first load that names them and only their devices get layers, whatever else this process registered.

    eval_callback: a llama_cpp.ggml_backend_sched_eval_callback that sees the graph's tensors as they
    are computed (kept alive on the returned Llama)."""
    global _log_echo
    opts = merged(options, threads=n_threads, n_gpu_layers=n_gpu_layers, prefetch=prefetch, repack=repack)
    llama_cpp = import_llama_cpp()
    path = Path(path)
    if not path.exists():
        raise LexiError(f"{path} does not exist")
    check_file(path)
    install_log_hook()
    from . import placement, rpc
    if opts.rpc:
        rpc.connect(list(opts.rpc))                     # process-wide, once per server
    devices = rpc.devices_for(opts.rpc) if rpc.servers() else None
    if opts.tensor_split:
        kw.setdefault("tensor_split", list(opts.tensor_split))
    clear_log()
    _log_echo = verbose
    from .devices import say_offload_notes
    say_offload_notes(path, opts)      # prefetch / repack options that do not reach offloaded layers: one line
    repack_on = placement.decide(path, opts.repack, opts.prefetch, cache=opts.expert_cache is not None)
    model_fields = {} if repack_on else {"use_extra_bufts": False}
    if devices is not None:
        model_fields["devices"] = ctypes.addressof(devices)
    from .moeplace import model_fields as placed
    placement_fields, overrides = placed(opts.cpu_moe, opts.override_tensor)   # --n-cpu-moe, -ot
    model_fields.update(placement_fields)
    if opts.expert_cache is not None:
        from ..gguf.reader import set_files
        from .expertmap import mapping_bases
        bases_before = {str(f): mapping_bases(f) for f in set_files(path)}
    try:
        with llama_params_with(eval_callback, model_fields or None):
            llm = llama_cpp.Llama(str(path), kv_overrides=kv_overrides or None, n_ctx=n_ctx, n_threads=opts.threads,
                                  n_threads_batch=opts.threads, n_gpu_layers=opts.n_gpu_layers, logits_all=logits_all,
                                  verbose=verbose, seed=seed, n_batch=n_batch, n_ubatch=n_batch, **kw)
        llm._lexi_eval_callback = eval_callback     # ctypes callbacks must outlive the context
        llm._lexi_devices = devices
        llm._lexi_buft_overrides = overrides        # the array the model params point to
        llm._lexi_repack = repack_on
        llm._lexi_options = opts
        if opts.prefetch != "off":
            set_prefetch(llm, opts.prefetch)
        if opts.expert_cache is not None:       # runtime.expertcache: bounded expert memory, the project's policy
            from .expertcache import install
            try:
                install(llm, path, opts.expert_cache, opts.cache_policy, bases_before, n_expert_active(llm),
                        predictor=opts.cache_predictor)
            except LexiError:
                llm.close()
                raise
        return llm
    except ValueError:
        with _log_lock:
            errors = [s.strip() for lvl, s in _log_lines if lvl == 3 or "error" in s.lower()]
        raise ModelLoadError(path, errors) from None
    finally:
        _log_echo = False


# rows for set_lexi_row besides the ladder's own 0..n-1 (llama.h: LLAMA_LEXI_ROW_MODEL / _LOADED)
ROW_MODEL = -1    # the model's own k in every layer (lexi off)
ROW_LOADED = -2   # the counts chosen at load (lexi.expert_used_count or the overridden ladder row)
ROW_CUSTOM = -3   # counts set by set_expert_counts


def lexi_fn(name: str, restype, argtypes):
    """A function of the lexi patch, from the same library handle llama-cpp-python uses."""
    fn = getattr(libllama(), name, None)
    if fn is None:
        raise LexiError(f"the llama_cpp in use has no {name}: it is not the lexi-patched build; run `make setup`")
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def lexi_n_rows(llm) -> int:
    return lexi_fn("llama_lexi_n_rows", ctypes.c_int32, [ctypes.c_void_p])(llm.model)


def lexi_row(llm) -> int:
    return lexi_fn("llama_lexi_get_row", ctypes.c_int32, [ctypes.c_void_p])(llm.ctx)


def set_lexi_row(llm, row: int, *, keep_cache: bool = False) -> None:
    """Run another ladder row (or ROW_MODEL / ROW_LOADED) from the next token on, without a reload.

    The KV cache of earlier tokens was computed with the old counts, so by default it is dropped and
    the history is evaluated again at the new counts (exact; llama-cpp-python re-feeds the prompt).
    keep_cache=True keeps it: faster, an approximation (earlier tokens keep their old-k K/V)."""
    if lexi_row(llm) == row:
        return
    if lexi_fn("llama_lexi_set_row", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32])(llm.ctx, row) != 0:
        raise LexiError(f"ladder row {row} does not exist: the model stores {lexi_n_rows(llm)} rows "
                        f"({ROW_MODEL}: the model's own k, {ROW_LOADED}: as loaded)")
    if not keep_cache:
        llm.reset()


def set_expert_counts(llm, counts: list[int] | None, *, keep_cache: bool = False) -> None:
    """Run any per-layer expert counts from the next token on (llama_lexi_set_counts), not only a stored
    ladder row: one count per block, 0 (or anything) for dense blocks, 1..n_expert for MoE blocks. None:
    back to the counts chosen at load. The KV cache is dropped unless keep_cache (see set_lexi_row)."""
    if counts is None:
        set_lexi_row(llm, ROW_LOADED, keep_cache=keep_cache)
        return
    from ..gguf.reader import model_info
    info = model_info(llm.model_path, check_lexi=False)
    counts = [int(c) for c in counts]
    if len(counts) != info.block_count:
        raise LexiError(f"{len(counts)} expert counts for a model of {info.block_count} blocks: give one per block "
                        f"(MoE blocks: {info.moe_layers[0]}..{info.moe_layers[-1]}, 0 for dense blocks)")
    bad = [(i, counts[i]) for i in info.moe_layers if not 1 <= counts[i] <= info.expert_count]
    if bad:
        raise LexiError(f"block {bad[0][0]}: {bad[0][1]} experts does not fit (1..{info.expert_count} in MoE blocks)")
    row = [c if i in info.moe_layers else max(1, min(c, info.expert_count)) for i, c in enumerate(counts)]
    arr = (ctypes.c_int32 * len(row))(*row)
    if lexi_fn("llama_lexi_set_counts", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32])(
            llm.ctx, arr, len(row)) != 0:
        said = captured_log().strip().splitlines()
        raise LexiError(f"the runtime refused counts {counts}" + (f": {said[-1]}" if said else ""))
    if not keep_cache:
        llm.reset()


def set_prefetch(llm, mode: str | int) -> None:
    """Expert prefetch for experts read from the mmapped file (docs/memory.md): "off", "chosen" (as soon
    as a layer's router has chosen, ask the OS for exactly those experts' bytes), "guess" (also, before
    this layer's experts run, the experts the next MoE layer's router picks from this layer's input) or
    "guess2" (two layers of guesses). Outputs are unchanged."""
    value = PREFETCH_MODES.get(mode, mode) if isinstance(mode, str) else mode
    if value not in PREFETCH_MODES.values():
        raise LexiError(f"unknown prefetch mode {mode!r}: use {', '.join(PREFETCH_MODES)}")
    lexi_fn("llama_lexi_set_prefetch", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32])(llm.ctx, value)


def prefetch_mode(llm) -> str:
    value = lexi_fn("llama_lexi_get_prefetch", ctypes.c_int32, [ctypes.c_void_p])(llm.ctx)
    return next(k for k, v in PREFETCH_MODES.items() if v == value)


def library_path() -> Path | None:
    try:
        llama_cpp = import_llama_cpp()
    except LexiError:
        return None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libllama.so", "libllama.dylib", "llama.dll"):
        if (libdir / name).exists():
            return libdir / name
    return None


def patches_built_in() -> dict[str, bool]:
    """Each lexi patch -> whether the libllama in use exports its symbol (all False without a runtime)."""
    try:
        lib = libllama()
    except LexiError:
        return {p: False for p in PATCH_SYMBOLS}
    return {p: hasattr(lib, sym) for p, sym in PATCH_SYMBOLS.items()}


def is_patched() -> bool:
    return all(patches_built_in().values())


def n_expert_active(llm) -> list[int]:
    """The experts each layer of a loaded model runs per token (llama_model_n_expert_active)."""
    fn = lexi_fn("llama_model_n_expert_active", ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32])
    n = import_llama_cpp().llama_model_n_layer(llm.model)
    return [fn(llm.model, i) for i in range(n)]


def weight_norm(llm) -> str:
    """How a loaded model weights fewer experts than trained: renorm | base (llama_model_lexi_weight_norm)."""
    return lexi_fn("llama_model_lexi_weight_norm", ctypes.c_char_p, [ctypes.c_void_p])(llm.model).decode()


def doctor() -> dict:
    """What runtime is in use, whether it honours the lexi keys, and the CPU facts a bug report needs:
    the CPU's features, the ggml CPU paths compiled in, and the flags the runtime was built with."""
    from . import cpu
    rec = runtime_record()
    out = {"llama_cpp": None, "library": None, "patched": False, "runtime": rec,
           "cpu": {"model": cpu.cpu_model(), "class": cpu.cpu_class(), "features": cpu.cpu_features()},
           "ggml_cpu_paths": None, "amx_matmul_compiled": None,
           "build_flags": (rec or {}).get("cmake_args")}
    try:
        import llama_cpp
        out["llama_cpp"] = f"{llama_cpp.__version__} ({Path(llama_cpp.__file__).parent})"
    except ImportError:
        return out
    lib = library_path()
    out["library"] = str(lib) if lib else None
    out["patches"] = patches_built_in()
    out["patched"] = all(out["patches"].values())
    info = cpu.ggml_system_info()
    out["ggml_cpu_paths"] = info
    out["amx_matmul_compiled"] = cpu.amx_matmul_compiled(info)
    out["rpc"] = bool(llama_cpp.llama_supports_rpc())
    from .devices import gpu_devices
    out["gpu_devices"] = gpu_devices()      # Vulkan / CUDA / Metal devices ggml registered ([] on a CPU build)
    out["tools"] = {t: str(Path(rec["bin_dir"]) / t) if rec and rec.get("bin_dir") and (Path(rec["bin_dir"]) / t).exists()
                    else None for t in ("ggml-rpc-server", "llama-server")}   # llama-server: built on first use
    return out
