"""The test tokenizer is recognised by llama.cpp's converter for the right reason (it is GPT-2's), and the
converter's refusal of unknown BPE pre-tokenizers is intact: we never weaken it."""
from __future__ import annotations

import json

import pytest

from lexi_gguf import LexiError
from lexi_gguf.gguf.reader import field_value, open_reader
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.testbeds.tinymodels import make_checkpoint


def test_gpt2_rebuilt_tokenizer_is_recognised(tiny_gguf):
    r = open_reader(tiny_gguf("olmoe"))
    assert field_value(r, "tokenizer.ggml.model") == "gpt2"
    assert field_value(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field_value(r, "tokenizer.ggml.tokens")) == 50257


def test_unknown_bpe_pretokenizer_is_still_refused(tmp_path, llama_cpp_dir):
    d = make_checkpoint("olmoe", tmp_path / "hf", llama_cpp_dir, seed=0, num_hidden_layers=1)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True      # a different pre-tokenizer: a different hash
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(LexiError, match="pre-tokenizer|chkhsh|not recognized|NotImplementedError"):
        convert_to_gguf(d, tmp_path / "x.gguf", llama_cpp_dir)
    assert not (tmp_path / "x.gguf").exists()
