"""Shared fixtures: the patched runtime's llama.cpp tree, tiny checkpoints and their GGUFs (cached per session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lexi_gguf import tinymodels

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "granitemoe"]


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    from lexi_gguf.runtime import llama_cpp_dir as find
    return find()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lexi")


@pytest.fixture(scope="session")
def tiny_checkpoint(workdir, llama_cpp_dir):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tinymodels.make_checkpoint(arch, workdir / f"hf-{arch}", llama_cpp_dir, seed=1)
        return made[arch]
    return get


@pytest.fixture(scope="session")
def tiny_gguf(workdir, tiny_checkpoint, llama_cpp_dir):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tinymodels.convert_to_gguf(tiny_checkpoint(arch), workdir / f"{arch}-f32.gguf", llama_cpp_dir)
        return made[arch]
    return get
