"""The built-in quality testbeds of other router families (issue 13) train and convert: their recipe gives
a checkpoint that llama.cpp's own converter accepts (a byte-level BPE it recognises), of the arch and
routing the recipe names. Two training steps only: the recipe's code path, not its quality."""
from __future__ import annotations

import hashlib

import pytest

from lexi_gguf.method.archs import spec_for
from lexi_gguf.runtime.procs import stream_module
from lexi_gguf.testbeds.builtin import RECIPES, corpus, train, training_env
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.gguf.reader import open_one
from lexi_gguf.method.weights import load_config


@pytest.mark.parametrize("name,gguf_arch,normalises", [("qwen3-testbed", "qwen3moe", True),
                                                        ("olmoe-testbed", "olmoe", False)])
def test_testbed_recipe_trains_and_converts(name, gguf_arch, normalises, tmp_path, llama_cpp_dir):
    r = RECIPES[name]
    model_dir = train(tmp_path / "model", steps=2, log=lambda *_: None, name=name)
    cfg = load_config(model_dir)
    assert spec_for(cfg["model_type"]).routing(cfg).norm_topk is normalises
    assert (model_dir / "eval.txt").stat().st_size > 10_000
    out = convert_to_gguf(model_dir, tmp_path / "m.gguf", llama_cpp_dir, outtype="f16")
    f = open_one(out)
    assert f.fields["general.architecture"].contents() == gguf_arch
    assert f.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert f.fields[f"{gguf_arch}.block_count"].contents() == r["layers"]
    assert f.fields[f"{gguf_arch}.expert_count"].contents() == r["experts"]
    assert f.fields[f"{gguf_arch}.expert_used_count"].contents() == r["k"]


def test_default_recipe_is_reproducible(tmp_path):
    """Two trainings of the default recipe (2 steps, each in the pinned child ensure_default_model uses)
    write byte-identical tokenizer, weights and eval text; and the corpus does not depend on what the
    calling process imported (this one has torch, transformers and pytest loaded)."""
    files = ("tokenizer.model", "model.safetensors", "eval.txt")
    digests = []
    for run in ("a", "b"):
        stream_module("lexi_gguf.testbeds.builtin", ["default", tmp_path / run, "--steps", 2], "training", log=lambda _: None,
                      env=training_env())
        digests.append({f: hashlib.sha256((tmp_path / run / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "eval.txt").read_text() == corpus()[1]
