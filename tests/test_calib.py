"""Calibrated profiling: the MoE layers' real inputs, captured from the runtime while the model reads a
text, replace the N(0, 1) draws; the deviation is then exactly transformers' MoE block on those inputs."""
from __future__ import annotations

import pytest
import torch

from lexi_gguf import LexiError, cli, keys, profile as prof
from lexi_gguf.calib import capture_inputs
from lexi_gguf.gguf_io import model_info
from lexi_gguf.tinymodels import hf_moe_block
from lexi_gguf.weights import SafetensorsSource

TEXT = ("The river bends twice before it reaches the old mill, where the water slows and turns green. "
        "Children from the village used to count the stones on the bank and argue about the number. "
        "In winter the mill wheel freezes, and the miller tells the same story about the year it cracked. ") * 6


def test_calibrated_deviation_is_transformers_on_the_captured_inputs(tiny_checkpoint, tiny_gguf):
    hf_dir, gguf = tiny_checkpoint("olmoe"), tiny_gguf("olmoe")
    calib = capture_inputs(gguf, TEXT, max_tokens=256)
    info = model_info(gguf)
    assert sorted(calib) == info.moe_layers and all(v.shape == (256, 64) for v in calib.values())
    src = SafetensorsSource(hf_dir)
    sens = prof.profile(src, seed=0, draw_tokens=16, progress=False, calib=calib)
    assert sens["settings"]["input"] == "calib" and sens["settings"]["samples"] == 256
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for i in info.moe_layers:
        block = hf_moe_block(hf, src.model.spec, i)
        x = torch.from_numpy(calib[i])
        yb = block(x, src.model.k_base)
        for k in range(1, src.model.k_base):
            ref = (block(x, k) - yb).reshape(-1, 16 * x.shape[1]).norm(dim=-1).mean().item()
            assert sens["layers"][i]["deviation"][k - 1] == pytest.approx(ref, rel=2e-4), (i, k)


def test_apply_and_convert_with_calib(tiny_checkpoint, tiny_gguf, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "a.gguf"
    assert cli.main(["apply", str(tiny_gguf("olmoe")), "-o", str(out), "--budget", "0.5", "--calib", str(text),
                     "--calib-tokens", "128"]) == 0
    info = model_info(out)
    assert info.lexi[keys.SENS_INPUT] == "calib" and info.lexi[keys.SENS_SAMPLES] == 128
    conv = tmp_path / "c.gguf"
    assert cli.main(["convert", str(tiny_checkpoint("olmoe")), "-o", str(conv), "--quant", "F32", "--calib", str(text),
                     "--calib-tokens", "128"]) == 0
    assert model_info(conv).lexi[keys.SENS_INPUT] == "calib"
    assert "captured 128 tokens" in capsys.readouterr().out


def test_calib_errors_are_clear(tiny_gguf, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    g = str(tiny_gguf("olmoe"))
    for args, msg in ((["--calib", str(empty)], "is empty"),
                      (["--calib", str(tmp_path / "none.txt")], "does not exist"),
                      (["--calib", str(text), "--sensitivity", str(text)], "--calib or --sensitivity")):
        assert cli.main(["apply", g, "-o", str(tmp_path / "x.gguf"), "--budget", "0.5", *args]) == 2
        assert msg in capsys.readouterr().err
    # Gemma 4 computes its router logits outside build_moe_ffn: nothing to capture, said so
    with pytest.raises(LexiError, match="no MoE router input to capture"):
        capture_inputs(tiny_gguf("gemma4_text"), "hello world " * 50)
    assert not (tmp_path / "x.gguf").exists()
