"""GGUF tensor data to f32 with ggml's own dequantizers (`ggml_get_type_traits(type)->to_float`, public in
ggml.h), from the runtime's loaded libggml: the values the runtime computes with, at C speed.

gguf-py's numpy dequantizer gives the same values but took 8.7 s for one qwen3-30b-a3b-shaped Q4_K_M layer
(128 experts x 3 x 768 x 2048) on a 2-core Xeon; the profiler reads 48 such layers. ctypes releases the GIL
during the call, so rows split over threads run in parallel.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import LexiError
from .binding import libggml


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_CACHE: dict[int, tuple[_TO_FLOAT, int, int, str]] = {}


def _traits(ggml_type: int) -> tuple[_TO_FLOAT, int, int, str]:
    if ggml_type not in _CACHE:
        lib = libggml()
        fn = lib.ggml_get_type_traits
        fn.restype, fn.argtypes = ctypes.POINTER(_Traits), [ctypes.c_int]
        t = fn(ggml_type).contents
        name = (t.type_name or b"?").decode()
        if not t.to_float:
            raise LexiError(f"ggml has no dequantizer for type {name} ({ggml_type})")
        _CACHE[ggml_type] = (_TO_FLOAT(t.to_float), int(t.blck_size), int(t.type_size), name)
    return _CACHE[ggml_type]


def to_f32(data: np.ndarray, ggml_type: int, threads: int = 1) -> np.ndarray:
    """Quantized rows [..., row bytes] (uint8, as gguf-py maps them) -> f32 [..., row values].
    threads > 1 splits the leading rows over that many threads."""
    fn, blck, size, name = _traits(int(ggml_type))
    raw = np.ascontiguousarray(data).view(np.uint8)
    row_bytes = raw.shape[-1]
    if row_bytes % size:
        raise LexiError(f"a {name} row of {row_bytes} bytes is not a whole number of {size}-byte blocks")
    row_vals = row_bytes // size * blck
    rows = raw.reshape(-1, row_bytes)
    out = np.empty((rows.shape[0], row_vals), np.float32)

    def run(lo: int, hi: int) -> None:
        if hi > lo:
            fn(rows[lo:hi].ctypes.data, out[lo:hi].ctypes.data, (hi - lo) * row_vals)
    n = rows.shape[0]
    if threads <= 1 or n < 2 * threads:
        run(0, n)
    else:
        cuts = np.linspace(0, n, threads + 1, dtype=int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, cuts[:-1], cuts[1:]))
    return out.reshape(*raw.shape[:-1], row_vals)
