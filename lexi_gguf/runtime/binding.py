"""The one place lexi-gguf depends on llama-cpp-python beyond its public API.

Everything else uses the binding's public names (`Llama.ctx`, `Llama.model`, the `llama_*` functions,
`llama_cpp.server.app.create_app`). Three things have no public way in the pinned release (0.3.36):
- the native libraries, to call the lexi patch's own functions and ggml's: opened again by path with
  RTLD_NOLOAD, which returns the handle the binding already loaded and never loads a second copy;
- an eval callback and ggml's `use_extra_bufts` (llama.cpp's --no-repack) at load: `Llama` builds its
  params from `llama_context_default_params()` / `llama_model_default_params()` and takes neither, so
  for the moment of construction those defaults carry ours (`llama_params_with`);
- serving an already loaded Llama: `create_app` always builds its own LlamaProxy from the model
  settings, so for the moment of `create_app` its `set_llama_proxy` installs ours (`create_server_app`).
tests/test_binding.py checks that the pinned binding still has the shape these rely on, and fails
loudly naming what moved when a new release changes it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from .. import LexiError


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LexiError("llama_cpp is not installed in this environment; run `make setup` "
                        "(or `lexi-gguf build-runtime`) to build the patched runtime") from None
    return llama_cpp


def lib_dir() -> Path:
    return Path(import_llama_cpp().__file__).parent / "lib"


def _loaded(names: tuple[str, ...], what: str) -> ctypes.CDLL:
    """A library the binding has already loaded, never a second copy (a second libggml would have its
    own, empty, backend registry). The wheel ships libggml.so, .so.0 and .so.0.x as copies, not links:
    each name is tried, by path and by soname, with RTLD_NOLOAD."""
    import_llama_cpp()       # loads libllama and the ggml it links to
    d = lib_dir()
    flags = getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL
    for name in names:
        for spec in (str(d / name), name):
            try:
                return ctypes.CDLL(spec, mode=flags)
            except OSError:
                continue
    raise LexiError(f"the {what} that llama-cpp-python uses is not loaded (looked for {', '.join(names)} in {d}); "
                    "rebuild the runtime with `make setup`")


def libllama() -> ctypes.CDLL:
    return _loaded(("libllama.so", "libllama.so.0", "libllama.dylib", "llama.dll"), "libllama")


def libggml() -> ctypes.CDLL:
    return _loaded(("libggml.so.0", "libggml.so", "libggml.0.dylib", "libggml.dylib", "ggml.dll"), "libggml")


@contextlib.contextmanager
def llama_params_with(eval_callback=None, model_fields: dict | None = None):
    """While a Llama is being constructed, the default context params carry `eval_callback` (cb_eval)
    and the default model params `model_fields` (e.g. use_extra_bufts=False). Restored on exit,
    whatever happens, so other Llama objects in the process are untouched."""
    mod = import_llama_cpp().llama_cpp
    ctx_default, model_default = mod.llama_context_default_params, mod.llama_model_default_params

    def ctx_params():
        params = ctx_default()
        if eval_callback is not None:
            params.cb_eval = eval_callback
            params.cb_eval_user_data = None
        return params

    def model_params():
        params = model_default()
        for k, v in (model_fields or {}).items():
            setattr(params, k, v)
        return params
    mod.llama_context_default_params, mod.llama_model_default_params = ctx_params, model_params
    try:
        yield
    finally:
        mod.llama_context_default_params, mod.llama_model_default_params = ctx_default, model_default


def create_server_app(proxy, server_settings, model_settings):
    """llama-cpp-python's FastAPI app answering every request with `proxy` (its LlamaProxy interface:
    called with a request's model id, it returns the Llama), instead of a proxy that loads the model
    from `model_settings` a second time."""
    from llama_cpp.server import app as app_mod
    original = app_mod.set_llama_proxy

    def ours(model_settings):
        app_mod._llama_proxy = proxy
    app_mod.set_llama_proxy = ours
    try:
        return app_mod.create_app(server_settings=server_settings, model_settings=model_settings)
    finally:
        app_mod.set_llama_proxy = original
