"""The patched llama.cpp runtime: building it from the pinned llama-cpp-python sdist (build), loading
a model and the lexi C API (llama: load, set_lexi_row, set_prefetch), the budgets a file stores
(budgets), the CPU class (cpu) and child processes (procs).
"""
from .llama import ROW_LOADED, ROW_MODEL, lexi_overrides, load, set_lexi_row, set_prefetch

__all__ = ["ROW_LOADED", "ROW_MODEL", "lexi_overrides", "load", "set_lexi_row", "set_prefetch"]
