"""The lexi patches: each applies in order to the pinned llama.cpp, each declares one function of the C API
by which the runtime tells it is built in, and the built runtime exports all of them."""
from __future__ import annotations

import re
import subprocess
import tarfile

from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.build import cache_root, read_pin
from conftest import LADDER, LADDER_DEFAULT


def _header(p) -> dict[str, str]:
    """The `Exports:` and `Depends on:` lines a patch opens with (before its first diff)."""
    head = p.read_text().split("diff --git", 1)[0]
    return dict(line.split(": ", 1) for line in head.splitlines() if line.startswith(("Exports: ", "Depends on: ")))


def test_every_patch_declares_the_symbol_it_exports():
    pin = read_pin()
    assert [p.name for p in pin.patches] == list(runtime.PATCH_SYMBOLS)
    for p in pin.patches:
        sym = runtime.PATCH_SYMBOLS[p.name]
        assert _header(p)["Exports"] == sym, p.name
        declared = re.findall(r"^\+\s*LLAMA_API [^(]*\b(\w+)\s*\(", p.read_text(), re.M)
        assert sym in declared, f"{p.name} does not declare {sym} in llama.h (it declares {declared})"
        others = [q for q in pin.patches if q != p]
        assert all(not re.search(rf"^\+.*LLAMA_API.*\b{sym}\b", q.read_text(), re.M) for q in others)


def _clean_tree(tmp_path):
    pin = read_pin()
    sdist = cache_root() / "sdist" / f"llama_cpp_python-{pin.version}.tar.gz"
    assert sdist.exists(), "make setup downloads the pinned sdist into the cache"
    root = f"llama_cpp_python-{pin.version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path, members=[m for m in tf.getmembers() if m.name.startswith((root + "src/", root + "include/"))],
                      filter="data")
    return tmp_path / root


def _apply(tree, p, dry: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["patch", "-p1", "--forward", "--batch", *(["--dry-run"] if dry else []), "-d", str(tree),
                           "-i", str(p)], capture_output=True, text=True)


def test_each_patch_applies_on_its_one_dependency_and_all_in_order(tmp_path):
    pin = read_pin()
    by_name = {p.name: p for p in pin.patches}
    for p in pin.patches:      # on a clean tree: the patch's dependency chain, then the patch, no fuzz
        chain = [p]
        while (dep := _header(chain[0])["Depends on"]) in by_name:
            chain.insert(0, by_name[dep])
        tree = _clean_tree(tmp_path / p.stem)
        for q in chain:
            r = _apply(tree, q)
            assert r.returncode == 0 and "fuzz" not in r.stdout, (p.name, q.name, r.stdout)
    tree = _clean_tree(tmp_path / "all")
    for p in pin.patches:
        r = _apply(tree, p)
        assert r.returncode == 0 and "fuzz" not in r.stdout, (p.name, r.stdout)


def test_runtime_exports_every_patch_and_reports_counts(laddered_gguf):
    assert runtime.patches_built_in() == {p: True for p in runtime.PATCH_SYMBOLS}
    assert runtime.is_patched()
    llm = runtime.load(laddered_gguf, n_ctx=32, n_threads=1)
    assert runtime.n_expert_active(llm) == LADDER_DEFAULT
    assert runtime.weight_norm(llm) == "renorm"
    llm.close()
    llm = runtime.load(laddered_gguf, n_ctx=32, n_threads=1,
                       kv_overrides={"lexi.budget_index": 2, "lexi.weight_norm": "base"})
    assert runtime.n_expert_active(llm) == LADDER[0.5]
    assert runtime.weight_norm(llm) == "base"
    llm.close()
