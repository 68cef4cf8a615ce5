"""End to end through the command line: convert, apply, inspect, chat; every bad input is refused
with a clear one-line message, a non-zero exit and no output file."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from lexi_gguf import cli
from lexi_gguf.gguf import keys
from lexi_gguf.method.archs import supported
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.gguf.writer import copy_with_metadata

LEXI = [sys.executable, "-m", "lexi_gguf.cli"]


def test_convert_writes_keys_ladder_and_quantized_experts(converted):
    import gguf
    info = model_info(converted)
    assert info.expert_used_count == 4                                  # standard key keeps the model's k
    counts = info.lexi[keys.EXPERT_USED_COUNT]
    assert sum(counts) == 12 and all(1 <= k <= 4 for k in counts)       # 0.75 x 4 layers x 4
    assert info.lexi[keys.METHOD] == "lexi-exact"
    assert list(info.lexi[keys.LADDER_BUDGETS]) == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert len(info.lexi[keys.SENS_DEVIATION]) == 4 * 4
    for i in range(4):
        for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert info.tensor_types[f"blk.{i}.{t}.weight"] == gguf.GGMLQuantizationType.Q8_0.name
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]   # temp files gone


def test_converted_file_loads_and_generates(converted):
    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(converted, n_ctx=128, n_threads=2)
    out = llm("The quick brown fox", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
    assert "lexi.expert_used_count = [" in runtime.captured_log()


def test_inspect_reports_budgets_and_savings(converted, capsys):
    assert cli.main(["inspect", str(converted), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["base_k"] == 4 and d["runtime_honours_keys"] is True
    names = [c["name"] for c in d["configs"]]
    assert names[0] == "default" and "budget 0.5" in names
    half = next(c for c in d["configs"] if c["name"] == "budget 0.5")
    full = next(c for c in d["configs"] if c["name"] == "budget 1")
    assert half["active_bytes"] < full["active_bytes"] and full["ideal_speedup"] == pytest.approx(1.0)


def test_chat_with_piped_stdin(converted):
    r = subprocess.run([*LEXI, "chat", str(converted), "--budget", "0.5", "--max-tokens", "8", "--threads", "2"],
                       input="Hello there\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout
    r = subprocess.run([*LEXI, "chat", str(converted), "--budget", "0.33"], input="hi\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "budget 0.33 is not stored" in r.stderr and "0.875" in r.stderr
    assert "Traceback" not in r.stderr


def test_apply_on_quantized_gguf_matches_safetensors_allocation(hf_olmoe, converted, tmp_path):
    """Profile the Q8_0 file's own (dequantized) weights and compare with the safetensors profile."""
    from lexi_gguf.method.allocate import allocate
    from lexi_gguf.method.gguf_weights import GGUFSource
    from lexi_gguf.method.profile import profile
    from lexi_gguf.method.weights import SafetensorsSource
    a = profile(SafetensorsSource(hf_olmoe), samples=1024, seed=0, progress=False)
    b = profile(GGUFSource(converted), samples=1024, seed=0, progress=False)
    for la, lb in zip(a["layers"], b["layers"]):        # Q8_0 moves D(k) by well under a percent
        assert lb["deviation"] == pytest.approx(la["deviation"], rel=0.02)
    for budget in (0.5, 0.625, 0.75, 0.875):
        assert allocate(a, budget=budget)["expert_used_count"] == allocate(b, budget=budget)["expert_used_count"]
    # and through the CLI on a file with no stored table to lean on (every lexi key dropped): apply must
    # profile the Q8_0 tensors themselves, and allocate what the safetensors profile allocates
    bare = copy_with_metadata(converted, tmp_path / "bare.gguf", {}, progress=False)
    assert not model_info(bare).lexi
    out = tmp_path / "applied.gguf"
    assert cli.main(["apply", str(bare), "-o", str(out), "--budget", "0.75", "--samples", "1024"]) == 0
    lx = model_info(out).lexi
    assert lx[keys.SENS_SOURCE].startswith("gguf:") and "Q8_0" in lx[keys.SENS_SOURCE]
    assert list(lx[keys.EXPERT_USED_COUNT]) == allocate(a, budget=0.75)["expert_used_count"]
    # --total is the same allocation as the budget fraction it amounts to (4 MoE layers x base k 4)
    by_total = tmp_path / "total.gguf"
    assert cli.main(["apply", str(bare), "-o", str(by_total), "--total", "12", "--samples", "1024"]) == 0
    assert list(model_info(by_total).lexi[keys.EXPERT_USED_COUNT]) == allocate(a, total=12)["expert_used_count"]


def test_apply_k_list_streams_and_validates(converted, tmp_path, capsys):
    out = tmp_path / "k.gguf"
    assert cli.main(["apply", str(converted), "-o", str(out), "--k", "1,4,2,3"]) == 0
    assert list(model_info(out).lexi[keys.EXPERT_USED_COUNT]) == [1, 4, 2, 3]
    assert out.stat().st_size == pytest.approx(converted.stat().st_size, rel=0.01)
    # the same output again needs --force
    assert cli.main(["apply", str(converted), "-o", str(out), "--k", "1,4,2,3"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["apply", str(converted), "-o", str(out), "--k", "2,2,2,2", "--force"]) == 0
    assert list(model_info(out).lexi[keys.EXPERT_USED_COUNT]) == [2, 2, 2, 2]
    for bad, msg in [("1,4,2", "has 3 entries but the model has 4 blocks"),
                     ("1,9,2,3", r"--k\[1\] = 9: block 1 is an MoE layer, k must be in 1..8"),
                     ("0,4,2,3", r"--k\[0\] = 0")]:
        dst = tmp_path / "bad.gguf"
        assert cli.main(["apply", str(converted), "-o", str(dst), "--k", bad]) == 2
        assert msg.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
        assert not dst.exists()


def _run(args):
    r = subprocess.run([*LEXI, *args], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_bad_inputs_are_refused_cleanly(hf_olmoe, converted, tmp_path, llama_cpp_dir):
    out = tmp_path / "o.gguf"
    # a dense model
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": 2,
                                                   "num_experts": 1, "num_experts_per_tok": 1}))
    cases = [(["convert", str(dense), "-o", str(out)], "dense model, LExI has nothing to adapt"),
             (["convert", str(tmp_path / "nope"), "-o", str(out)], "is not a directory"),
             (["convert", str(hf_olmoe), "-o", str(out), "--budget", "1.5"], "fraction of the base budget"),
             (["convert", str(hf_olmoe), "-o", str(out), "--budget", "0.01", "--samples", "64"], "outside [4, 16]"),
             (["convert", str(hf_olmoe), "-o", str(out), "--quant", "Q3_ZZ"], "unknown quantization 'Q3_ZZ'"),
             (["convert", str(hf_olmoe), "-o", str(converted)], "already exists; pass --force")]
    unsupported = tmp_path / "mamba"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    cases.append((["convert", str(unsupported), "-o", str(out)], "supports: " + supported()))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(converted.read_bytes()[:4096])
    cases.append((["apply", str(corrupt), "-o", str(out), "--k", "1,1,1,1"], "is not a valid GGUF file: at byte"))
    cases.append((["inspect", str(corrupt)], "is not a valid GGUF file: at byte"))
    for args, msg in cases:
        r = _run(args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
        assert not out.exists()
    # a missing shard and a truncated shard
    from transformers import AutoModelForCausalLM
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_olmoe).save_pretrained(sharded, max_shard_size="3MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((hf_olmoe / f).read_bytes())
    shards = sorted(p for p in sharded.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 3])
    r = _run(["convert", str(sharded), "-o", str(out), "--samples", "64"])
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr, r.stderr
    shards[0].unlink()
    r = _run(["convert", str(sharded), "-o", str(out)])
    assert r.returncode == 2 and f"missing: {shards[0].name}" in r.stderr
    assert not out.exists()


def test_full_disk_leaves_no_temp_files(hf_olmoe, converted, tmp_path, monkeypatch, capsys):
    import lexi_gguf.export.convert as conv

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(conv, "copy_with_metadata", no_space)
    out = tmp_path / "full.gguf"
    sens = tmp_path / "s.json"
    assert cli.main(["profile", str(hf_olmoe), "-o", str(sens), "--samples", "64"]) == 0
    assert cli.main(["convert", str(hf_olmoe), "-o", str(out), "--sensitivity", str(sens)]) == 2
    assert "disk holding" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [sens]


def test_too_small_disk_is_refused_before_any_work(hf_olmoe, converted, tmp_path, monkeypatch, capsys):
    import lexi_gguf.gguf.writer as writer
    from lexi_gguf.export.convert import disk_plan
    from lexi_gguf.method.weights import SafetensorsSource
    seen = []
    monkeypatch.setattr(writer, "free_bytes", lambda folder: seen.append(folder) or 3 << 20)
    need, why = disk_plan(SafetensorsSource(hf_olmoe).n_params(), "Q8_0", "auto")
    assert "quantized" in why and need > converted.stat().st_size          # the f16 file + the Q8_0 beside it
    for args, what in ((["convert", str(hf_olmoe), "-o", str(tmp_path / "c.gguf")], "convert ("),
                       (["apply", str(converted), "-o", str(tmp_path / "a.gguf"), "--budget", "0.5"], "writing a.gguf")):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and "MiB free on the file system" in err and "which has 3.0 MiB" in err, err
        assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [] and len(seen) == 2      # refused before profiling or writing


def test_profile_allocate_cli_with_plots_and_infeasible_budget(hf_olmoe, tmp_path, capsys):
    sens, plan, png, heat = tmp_path / "s.json", tmp_path / "p.json", tmp_path / "p.png", tmp_path / "s.png"
    assert cli.main(["profile", str(hf_olmoe), "-o", str(sens), "--samples", "256", "--plot", str(heat)]) == 0
    s = json.loads(sens.read_text())
    assert s["arch"] == "olmoe" and s["k_base"] == 4 and s["n_expert"] == 8
    assert all(len(L["deviation"]) == 4 and len(L["stderr"]) == 4 for L in s["layers"])
    assert s["settings"]["samples"] == 256 and heat.stat().st_size > 1000
    assert cli.main(["allocate", str(sens), "--avg-k", "2.5", "--solver", "evolutionary", "--compare",
                     "-o", str(plan), "--plot", str(png)]) == 0
    p = json.loads(plan.read_text())
    assert sum(p["expert_used_count"]) == p["total"] == 10 and p["solver"] == "evolutionary"
    assert p["objectives"]["exact"] == pytest.approx(p["objective"])
    assert png.stat().st_size > 1000
    bad = tmp_path / "bad.json"
    assert cli.main(["allocate", str(sens), "--total", "40", "-o", str(bad)]) == 2
    assert "outside [4, 16]" in capsys.readouterr().err and not bad.exists()
    assert cli.main(["allocate", str(sens), "--total", "9", "--backend-safe", "metal", "--allowed-k", "2,4",
                     "-o", str(bad)]) == 2
    assert "sums exactly to 9" in capsys.readouterr().err and not bad.exists()


def test_device_options_become_one_load_options_object():
    """Every command that loads a model turns its device options into one LoadOptions (runtime.options)
    and hands it down; building it connects and sets nothing process-wide (the load registers the RPC
    servers its options name), so two commands' options in one process do not leak into each other."""
    from lexi_gguf.cli.common import load_options
    from lexi_gguf.runtime import rpc
    from lexi_gguf.runtime.options import LoadOptions
    ap = cli.build_parser()
    remote = ap.parse_args(["chat", "m.gguf", "--rpc", "127.0.0.1:9,box", "--tensor-split", "2,1", "--repack", "off",
                            "--threads", "3"])
    assert load_options(remote, "guess") == LoadOptions(n_gpu_layers=-1, rpc=("127.0.0.1:9", "box:50052"),
                                                        tensor_split=(2.0, 1.0), repack="off", prefetch="guess",
                                                        threads=3)
    assert rpc.servers() == []                  # nothing probed or registered (port 9 answers nobody)
    for argv in (["serve", "m.gguf"], ["bench", "m.gguf"], ["eval", "m.gguf", "--text", "t"],
                 ["trace", "run", "m.gguf", "--text", "t", "-o", "t.npz"]):
        assert load_options(ap.parse_args(argv)) == LoadOptions(), argv      # the defaults: all here
    assert load_options(ap.parse_args(["bench", "m.gguf", "--rpc", "h:1", "-ngl", "2"])).n_gpu_layers == 2
