"""The GGUFs people download: every quant type the pinned llama-quantize makes for MoE experts (IQ types
with an importance matrix from the pinned llama-imatrix), and FP8 safetensors releases (DeepSeek-V3 /
Kimi-K2 layout), read by apply / convert one expert at a time."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lexi_gguf import cli
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.gguf import keys
from lexi_gguf.gguf.reader import model_info, open_reader
from lexi_gguf.method.gguf_weights import GGUFSource
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.llama import tool
from lexi_gguf.testbeds.tinymodels import fp8_checkpoint, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
# the expert type llama-quantize gives each mix (a K-quant mix keeps some experts at more bits)
TYPES = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q4_0": "Q4_0",
         "Q8_0": "Q8_0", "IQ2_XXS": "IQ2_XXS", "IQ3_XXS": "IQ3_XXS", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
         "MXFP4_MOE": "MXFP4", "BF16": "BF16"}
NEEDS_IMATRIX = {"IQ2_XXS", "IQ3_XXS"}


@pytest.fixture(scope="module")
def f32_model(llama_cpp_dir, tmp_path_factory):
    """An OLMoE with rows of 256 (every K/IQ block fits), its f32 GGUF profiled by apply, and an
    importance matrix computed by llama-imatrix on the README."""
    d = tmp_path_factory.mktemp("quants")
    hf = make_checkpoint("olmoe", d / "hf", llama_cpp_dir, seed=7, hidden_size=256, intermediate_size=256,
                         router_scale=4.0)
    f32 = convert_to_gguf(hf, d / "f32.gguf", llama_cpp_dir)
    subprocess.run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(REPO / "README.md"), "-c", "128",
                    "--chunks", "4", "-t", "2", "-o", str(d / "imatrix.gguf")], check=True, capture_output=True)
    ref = d / "f32-lexi.gguf"
    assert cli.main(["apply", str(f32), "-o", str(ref), "--budget", "0.5", "--samples", "1024"]) == 0
    return f32, ref, d / "imatrix.gguf"


def objective(dev: np.ndarray, counts: list[int], moe: list[int]) -> float:
    """LExI's summed deviation of per-layer counts, on one table (deviation[layer, k - 1])."""
    return float(sum(dev[i, counts[i] - 1] for i in moe))


@pytest.mark.parametrize("quant", list(TYPES))
def test_apply_reads_every_quant_type(f32_model, quant, tmp_path, capsys):
    f32, ref, imatrix = f32_model
    q = tmp_path / f"{quant}.gguf"
    cmd = [str(tool("llama-quantize")), *(["--imatrix", str(imatrix)] if quant in NEEDS_IMATRIX else []),
           str(f32), str(q), quant, "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    info = model_info(q)
    assert info.tensor_types["blk.0.ffn_up_exps.weight"] == TYPES[quant]
    out = tmp_path / "lexi.gguf"
    assert cli.main(["apply", str(q), "-o", str(out), "--budget", "0.5", "--samples", "1024"]) == 0
    capsys.readouterr()
    # the allocation from the quantized weights is the f32 file's, or within 10 % of its objective
    # measured on the f32 table (2- and 3-bit experts move the deviations they are ranked by)
    r, g = model_info(ref), model_info(out)
    kb, moe = info.expert_used_count, info.moe_layers
    dev = np.asarray(r.lexi[keys.SENS_DEVIATION]).reshape(-1, kb)
    k_ref, k_got = list(r.lexi[keys.EXPERT_USED_COUNT]), list(g.lexi[keys.EXPERT_USED_COUNT])
    assert sum(k_got) == sum(k_ref)
    assert k_got == k_ref or objective(dev, k_got, moe) <= 1.10 * objective(dev, k_ref, moe), (k_got, k_ref)
    assert g.lexi[keys.SENS_SOURCE].startswith("gguf:") and TYPES[quant] in g.lexi[keys.SENS_SOURCE]
    # the profiler reads experts through ggml's dequantizer: the values gguf-py's reference gives
    t = {x.name: x for x in open_reader(q).tensors}["blk.1.ffn_down_exps.weight"]
    got = GGUFSource(q).layer(1).down[3]
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), dequantize(t.data[3], t.tensor_type))
    # tensor data of the output bit-identical to the input, and the file runs
    a, b = open_reader(q), open_reader(out)
    assert all(x.name == y.name and x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data)
               for x, y in zip(a.tensors, b.tensors, strict=True))
    llm = runtime.load(out, n_ctx=64, n_threads=2)
    text = llm("The", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert isinstance(text, str) and text


def test_nan_in_a_gguf_expert_is_refused(f32_model, tmp_path, capsys):
    """A NaN in one expert of a downloaded file: apply names the tensor and the expert, exits 2 (a refused input), writes nothing."""
    f32 = f32_model[0]
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(f32.read_bytes())
    t = {x.name: x for x in open_reader(bad).tensors}["blk.1.ffn_up_exps.weight"]
    row = t.data.shape[1] * t.data.shape[2] * 4                     # f32 bytes of one expert
    with open(bad, "r+b") as f:
        f.seek(int(t.data_offset) + 5 * row + 8)
        f.write(np.array([np.nan], np.float32).tobytes())
    out = tmp_path / "out.gguf"
    assert cli.main(["apply", str(bad), "-o", str(out), "--budget", "0.5", "--samples", "256"]) == 2
    assert "blk.1.ffn_up_exps.weight expert 5 contains NaN" in capsys.readouterr().err
    assert not out.exists()


def test_fp8_release_profiles_and_converts(llama_cpp_dir, tmp_path):
    from lexi_gguf.method.weights import SafetensorsSource
    hf = make_checkpoint("deepseek_v3", tmp_path / "hf", llama_cpp_dir, seed=3, hidden_size=256,
                         moe_intermediate_size=192, router_scale=4.0)
    fp8 = fp8_checkpoint(hf, tmp_path / "fp8")
    src = SafetensorsSource(fp8)
    i = src.model.moe_layers[0]
    name = f"model.layers.{i}.mlp.experts.0.down_proj.weight"            # [256, 192]: a partial tile
    w, s = src._open("model.safetensors").get_tensor(name), src.get(name + "_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    # block by block, scales applied: as a plain loop over the tiles computes it
    want = torch.empty(w.shape)
    for r in range(2):
        for c in range(2):
            want[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].float() * s[r, c]
    got = src.layer(i).down[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    # the pinned converter dequantises the same way: its bf16 experts equal ours bit for bit
    out = tmp_path / "fp8.gguf"
    assert cli.main(["convert", str(fp8), "-o", str(out), "--quant", "BF16", "--samples", "512"]) == 0
    t = {x.name: x for x in open_reader(out).tensors}[f"blk.{i}.ffn_down_exps.weight"]
    conv = torch.from_numpy(np.asarray(t.data).view(np.int16)[0].copy()).view(torch.bfloat16)
    assert torch.equal(conv, got)
    assert model_info(out).lexi[keys.SENS_SOURCE] == "safetensors"
    llm = runtime.load(out, n_ctx=64, n_threads=2)          # and the converted release runs
    text = llm("The", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert isinstance(text, str) and text
