"""The pinned bindings still have the shape lexi-gguf's one adapter (runtime/binding.py) and the fast GGUF
reader (gguf/reader.py) rely on. A new llama-cpp-python or gguf-py that moves any of it fails here,
naming what moved, instead of breaking a load, a server or a file read somewhere else."""
from __future__ import annotations

import inspect

import numpy as np


def test_llama_has_public_ctx_and_model():
    import llama_cpp
    for name in ("ctx", "model"):
        assert isinstance(getattr(llama_cpp.Llama, name, None), property), f"Llama.{name} is no longer a property"
    for fn in ("llama_vocab_get_add_bos", "llama_model_get_vocab", "llama_synchronize", "llama_get_logits_ith",
               "llama_log_set", "llama_supports_rpc", "llama_model_quantize"):
        assert callable(getattr(llama_cpp, fn, None)), f"llama_cpp.{fn} is gone"


def test_llama_builds_its_params_from_the_module_defaults():
    """binding.llama_params_with swaps these two module functions while a Llama is constructed."""
    import llama_cpp
    src = inspect.getsource(llama_cpp.Llama.__init__)
    for fn in ("llama_context_default_params", "llama_model_default_params"):
        assert f"llama_cpp.{fn}()" in src, f"Llama.__init__ no longer calls llama_cpp.{fn}()"
        assert callable(getattr(llama_cpp.llama_cpp, fn))
    params = llama_cpp.llama_context_default_params()
    assert hasattr(params, "cb_eval") and hasattr(params, "cb_eval_user_data")
    assert hasattr(llama_cpp.llama_model_default_params(), "use_extra_bufts")


def test_server_app_takes_its_proxy_from_set_llama_proxy():
    """binding.create_server_app installs our proxy through the module's set_llama_proxy / _llama_proxy."""
    from llama_cpp.server import app as app_mod
    assert "set_llama_proxy(model_settings=model_settings)" in inspect.getsource(app_mod.create_app)
    assert "_llama_proxy" in inspect.getsource(app_mod.get_llama_proxy)
    assert "_llama_proxy" in vars(app_mod)


def test_native_libraries_are_the_loaded_ones():
    from lexi_gguf.runtime import binding
    assert hasattr(binding.libllama(), "llama_lexi_set_row")        # the patched libllama, already loaded
    assert hasattr(binding.libggml(), "ggml_backend_tensor_get")


def test_fast_reader_reads_what_gguf_py_reads(llama_cpp_dir):
    """gguf.reader's fast path overrides GGUFReader._get_field_parts (gguf-py has no public way to skip
    per-element views): its fields must equal the stock reader's on a real vocabulary."""
    import gguf

    from lexi_gguf.gguf.reader import _reader_class
    sig = inspect.signature(gguf.GGUFReader._get_field_parts)
    assert list(sig.parameters) == ["self", "orig_offs", "raw_type"], f"GGUFReader._get_field_parts is now {sig}"
    path = llama_cpp_dir / "models" / "ggml-vocab-gpt-2.gguf"
    fast, stock = _reader_class()(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    for name, f in stock.fields.items():
        a, b = fast.fields[name], f
        assert a.types == b.types and a.offset == b.offset and a.name == b.name, name
        if not name.startswith("GGUF."):
            va, vb = a.contents(), b.contents()
            assert (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb), name
