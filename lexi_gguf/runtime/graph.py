"""llama.cpp's compute graph seen from Python, as the eval callback sees it: the leading fields of
ggml_tensor (its layout in the pinned ggml.h; tests/test_layout.py compiles that header and checks every
offset), and reading a tensor's data from any backend."""
from __future__ import annotations

import ctypes

import numpy as np

from .. import LexiError

# ggml_tensor's leading fields (ggml.h of the pinned llama.cpp): enough to read shape, strides and srcs
GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10


class GGMLTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
                ("nb", ctypes.c_size_t * GGML_MAX_DIMS), ("op", ctypes.c_int32), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC)]


GGML_F32, GGML_F16, GGML_I32 = 0, 1, 26
DTYPES = {GGML_F32: np.float32, GGML_F16: np.float16, GGML_I32: np.int32}


def ggml_lib():
    from .binding import libggml
    lib = libggml()
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def read_tensor(lib, ptr) -> np.ndarray:
    """A tensor's data (any backend, any strides) as rows of ne[0] elements."""
    t = GGMLTensor.from_address(ptr)
    dtype = DTYPES.get(t.type)
    if dtype is None:
        raise LexiError(f"cannot trace tensor {lib.ggml_get_name(ptr).decode()} of ggml type {t.type}")
    n = lib.ggml_nbytes(ptr)
    raw = np.empty(n, dtype=np.uint8)
    lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, n)
    view = np.ndarray(shape=tuple(t.ne)[::-1], dtype=dtype, buffer=raw, strides=tuple(t.nb)[::-1])
    return view.reshape(-1, t.ne[0]) if t.ne[0] > 0 else view.reshape(0, 0)   # rows of ne[0]


def tensor_src(ptr, i: int) -> int:
    """The address of a graph tensor's i-th source."""
    return GGMLTensor.from_address(ptr).src[i]
