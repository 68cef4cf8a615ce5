"""Shared fixtures: the patched runtime's llama.cpp tree, tiny checkpoints and their GGUFs (cached per session)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lexi_gguf import cli
from lexi_gguf.testbeds import tinymodels
from lexi_gguf.method.archs import ARCHS as REGISTRY
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.testbeds.tinymodels import make_checkpoint

ARCHS = list(REGISTRY)   # every registered architecture is tested (and listed in docs/architectures.md)
GGML_TYPE_F32 = 0
TOKENS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 1212, 318, 257, 1332, 286, 262, 1080]


def f32_logits(path, tokens=TOKENS, **kv):
    """Logits of every token through the patched runtime, f32 KV cache (llama.cpp's default f16 cache
    alone moves logits by ~1e-3), with kv overrides."""
    import numpy as np

    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(path, kv_overrides=kv or None, n_ctx=64, logits_all=True, n_threads=2,
                       type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    from lexi_gguf.runtime.llama import llama_cpp_dir as find
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
            made[arch] = convert_to_gguf(tiny_checkpoint(arch), workdir / f"{arch}-f32.gguf", llama_cpp_dir)
        return made[arch]
    return get


@pytest.fixture(scope="session")
def hf_olmoe(tmp_path_factory, llama_cpp_dir):
    # expert ffn 64 and hidden 64: rows divisible by Q8_0's block of 32, so experts really quantize
    return make_checkpoint("olmoe", tmp_path_factory.mktemp("cli") / "hf", llama_cpp_dir, seed=5,
                           intermediate_size=64, router_scale=4.0)


@pytest.fixture(scope="session")
def converted(hf_olmoe, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "olmoe-q8.gguf"
    assert cli.main(["convert", str(hf_olmoe), "-o", str(out), "--budget", "0.75", "--quant", "Q8_0",
                     "--samples", "1024", "--threads", "2"]) == 0
    return out




# a file that stores a default and a ladder of three budgets (4 blocks, 8 experts, base k 4)
LADDER_DEFAULT = [3, 1, 4, 2]
LADDER = {1.0: [4, 4, 4, 4], 0.625: [1, 4, 2, 3], 0.5: [2, 1, 4, 1]}


@pytest.fixture(scope="session")
def laddered_gguf(tiny_gguf, workdir):
    from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
    from lexi_gguf.gguf.reader import model_info
    src = tiny_gguf("qwen3_moe")   # renormalises top-k: the counts change every layer's weights
    ladder = [{"budget": b, "total": sum(c), "expert_used_count": c} for b, c in LADDER.items()]
    md = lexi_metadata(model_info(src), LADDER_DEFAULT, "manual", ladder=ladder)
    return copy_with_metadata(src, workdir / "qwen3_moe-ladder.gguf", md, progress=False)


@pytest.fixture(scope="session")
def expert_heavy_gguf(workdir, llama_cpp_dir):
    """An OLMoE whose experts are most of its bytes (32 x 128 KiB per tensor and layer, f32: never
    repacked, so they are read from the mmapped file)."""
    out = workdir / "olmoe-expert-heavy-f32.gguf"
    if not out.exists():
        hf = tinymodels.make_checkpoint("olmoe", workdir / "hf-olmoe-expert-heavy", llama_cpp_dir, seed=3,
                                        hidden_size=128, intermediate_size=256, num_experts=32)
        convert_to_gguf(hf, out, llama_cpp_dir)
    return out


# --- docs/architectures.md is rendered from these tests' results (make docs) ---------------------------------
ARCH_TESTS = {"test_stage1_matches_transformers_moe_block": "profile", "test_convert_and_apply_every_arch": "convert",
              "test_per_layer_k_matches_transformers": "runtime"}
_ARCH_RESULTS: dict[str, dict[str, str]] = {}
_ARCH_DETAIL: dict[tuple[str, str], str] = {}


@pytest.fixture
def arch_detail():
    """arch_detail(arch, column, text): a number to show next to the pass in docs/architectures.md."""
    def record(arch: str, column: str, text: str) -> None:
        _ARCH_DETAIL[(arch, column)] = text
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    col = ARCH_TESTS.get(getattr(item, "originalname", ""))
    if col is None or not hasattr(item, "callspec") or (rep.when != "call" and not rep.failed):
        return
    arch = item.callspec.params["arch"]
    detail = _ARCH_DETAIL.get((arch, col))
    _ARCH_RESULTS.setdefault(arch, {})[col] = ("pass" + (f" ({detail})" if detail else "")) if rep.passed else "FAIL"


def pytest_addoption(parser):
    parser.addoption("--arch-results", metavar="FILE", help="write each architecture's profile / convert / runtime "
                     "results here as JSON (make docs renders docs/architectures.md from it)")


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--arch-results")
    if not out:
        return
    import json

    from lexi_gguf.runtime.cpu import machine
    m = machine()
    Path(out).write_text(json.dumps({"machine": f"{m['cpu']} ({m['cpu_class']}), {m['cores']} cores",
                                     "results": _ARCH_RESULTS}, indent=1))


def greedy_logits(path, options, n: int = 6):
    """A prompt, then greedy decode token by token through runtime.llama.load with `options`: each step's
    logits, and the model (still loaded: its expert cache can be read)."""
    import numpy as np
    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(path, n_ctx=64, n_threads=2, logits_all=True, options=options)
    llm.eval(llm.tokenize(b"The quick brown fox jumps"))
    out = []
    for _ in range(n):
        lg = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        out.append(lg)
        llm.eval([int(np.argmax(lg))])
    return llm, np.array(out)
