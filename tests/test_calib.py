"""Calibrated profiling. --calib-metric deviation: the MoE layers' real inputs, captured from the runtime
while the model reads a text, replace the N(0, 1) draws; the deviation is then exactly transformers' MoE
block on those inputs. --calib-metric kld (the default): each (layer, k) entry is the KL divergence the
runtime measures with only that layer lowered, equal to loading a file with those counts."""
from __future__ import annotations

import json

import pytest
import torch

from lexi_gguf import LexiError, cli
from lexi_gguf.gguf import keys
from lexi_gguf.method import profile as prof
from lexi_gguf.method.allocate import allocate
from lexi_gguf.method.calib import capture_inputs, kld_table
from lexi_gguf.gguf.reader import model_info, sensitivity_from_gguf
from lexi_gguf.testbeds.tinymodels import hf_moe_block
from lexi_gguf.method.weights import SafetensorsSource

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
                     "--calib-metric", "deviation", "--calib-tokens", "128"]) == 0
    info = model_info(out)
    assert info.lexi[keys.SENS_INPUT] == "calib" and info.lexi[keys.SENS_SAMPLES] == 128
    conv = tmp_path / "c.gguf"
    assert cli.main(["convert", str(tiny_checkpoint("olmoe")), "-o", str(conv), "--quant", "F32", "--calib", str(text),
                     "--calib-metric", "deviation", "--calib-tokens", "128"]) == 0
    assert model_info(conv).lexi[keys.SENS_INPUT] == "calib"
    assert "captured 128 tokens" in capsys.readouterr().out


def _mean_kld(path, ref_path, ctx: int, n_chunks: int) -> float:
    from lexi_gguf.runtime.scoring import chunk_logprobs, text_chunks
    from lexi_gguf.runtime.llama import load
    out = []
    for p in (ref_path, path):
        llm = load(p, n_ctx=ctx, n_batch=ctx, logits_all=True)
        out.append([chunk_logprobs(llm, c).astype("float64") for c in text_chunks(llm, TEXT, ctx)[:n_chunks]])
        llm.close()
    import numpy as np
    return float(np.mean([(np.exp(r) * (r - q)).sum(-1).mean() for r, q in zip(*out)]))


def test_kld_table_entries_are_the_kld_of_a_file_with_those_counts(tiny_gguf, tmp_path):
    g = tiny_gguf("mixtral")
    info = model_info(g)
    kb = info.expert_used_count
    sens = kld_table(g, TEXT, max_tokens=192, n_ctx=64, progress=False)
    assert sens["settings"]["input"] == "calib-kld" and sens["settings"]["samples"] == 192
    dev = {L["index"]: L["deviation"] for L in sens["layers"] if L["moe"]}
    assert sorted(dev) == info.moe_layers
    assert all(d[kb - 1] == 0.0 and min(d) >= 0.0 for d in dev.values())
    assert all(d[0] > d[kb - 2] for d in dev.values())    # one expert costs more than base k - 1
    # an entry against an independent route: a file whose load-time counts lower that layer (apply --k)
    for j, k in ((info.moe_layers[0], 1), (info.moe_layers[-1], kb - 1)):
        counts = [kb] * info.block_count
        counts[j] = k
        f = tmp_path / f"k{j}-{k}.gguf"
        assert cli.main(["apply", str(g), "-o", str(f), "--k", ",".join(map(str, counts))]) == 0
        assert dev[j][k - 1] == pytest.approx(_mean_kld(f, g, 64, 3), rel=1e-6, abs=1e-9), (j, k)


def test_apply_and_convert_with_kld_calib_allocate_from_the_measured_table(tiny_checkpoint, tiny_gguf, tmp_path,
                                                                           capsys):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "a.gguf"
    assert cli.main(["apply", str(tiny_gguf("olmoe")), "-o", str(out), "--budget", "0.5", "--calib", str(text),
                     "--calib-tokens", "128"]) == 0
    assert "probes x 128 tokens" in capsys.readouterr().out
    info = model_info(out)
    assert info.lexi[keys.SENS_INPUT] == "calib-kld" and info.lexi[keys.SENS_SAMPLES] == 128
    stored = sensitivity_from_gguf(info)
    assert allocate(stored, budget=0.5)["expert_used_count"] == info.lexi[keys.EXPERT_USED_COUNT]
    conv = tmp_path / "c.gguf"     # convert measures on its own converted file, before quantizing
    assert cli.main(["convert", str(tiny_checkpoint("olmoe")), "-o", str(conv), "--quant", "Q8_0", "--calib", str(text),
                     "--calib-tokens", "64"]) == 0
    assert model_info(conv).lexi[keys.SENS_INPUT] == "calib-kld"
    from lexi_gguf.export.apply import apply
    with pytest.raises(LexiError, match="unknown --calib-metric 'nope': use kld or deviation"):
        apply(tiny_gguf("olmoe"), tmp_path / "b.gguf", budget=0.5, calib_text=TEXT, calib_metric="nope")
    assert not (tmp_path / "b.gguf").exists()


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


def test_calib_builtin_reads_pythons_own_docs_never_the_eval_text(tiny_gguf, tmp_path, capsys):
    """`--calib builtin`: no file to bring; the standard library's documentation (the testbeds' training
    text), never their held-out evaluation text. `profile` takes the GGUF itself and reads it there."""
    import argparse

    from lexi_gguf.cli.common import calib_text
    from lexi_gguf.testbeds.builtin import corpus
    train, held_out = corpus()
    text = calib_text(argparse.Namespace(calib="builtin"))
    assert text == train and len(text) > 100_000
    assert all(doc not in text for doc in held_out.split("\n\n")[:20] if len(doc) > 400)
    out = tmp_path / "sens.json"
    assert cli.main(["profile", str(tiny_gguf("olmoe")), "-o", str(out), "--calib", "builtin",
                     "--calib-tokens", "64"]) == 0
    sens = json.loads(out.read_text())
    assert sens["settings"]["input"] == "calib-kld" and sens["source"].startswith("gguf:")
    assert all(L["deviation"][-1] == 0 for L in sens["layers"] if L["moe"])
