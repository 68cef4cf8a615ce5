"""llama.cpp's RPC backend on loopback: two ggml-rpc-server processes from the patched tree hold the
layers; the logits equal a local run at every budget (switched in place across RPC), prefetch on a
model half on RPC skips the remote layers with one line and changes nothing, and a server that is
down, or dies mid-run, is a clear error with a non-zero exit, not an abort or a hang; a trace over RPC
records the local run's experts. Which servers a load uses is its own options': in a process that has
registered two servers, a load naming one puts layers on that one only, and a load naming none stays
local.

Each client runs in a child process: registering RPC servers is process-wide in llama.cpp."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lexi_gguf import LexiError
from lexi_gguf.runtime import rpc
from lexi_gguf.runtime.llama import ROW_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout root: bench/ helpers
from bench.loadgen import free_port  # noqa: E402

from conftest import TOKENS

# measured 0.0 (bit-identical) on loopback, AVX2 EPYC: the servers run the same CPU kernels on the same
# weights; the tolerance leaves room for a server machine whose CPU picks other kernels
TOL = 1e-4
CLIENT = r"""
import json, re, sys
import numpy as np
from lexi_gguf.runtime import llama as rt
from lexi_gguf.runtime.options import LoadOptions
a = json.loads(sys.argv[1])

def buffers():
    return sorted(set(re.findall(r"load_tensors:\s+(\S+) model buffer size", rt.captured_log())))

def logits(llm):
    llm.reset()
    llm.eval(a["tokens"])
    return np.array(llm.scores[:len(a["tokens"])], dtype=np.float32)

def open_model(options):
    return rt.load(a["model"], options=options, n_ctx=64, logits_all=True, n_threads=1, type_k=0, type_v=0)

ref = {}
llm = open_model(LoadOptions())
for row in a["rows"]:
    rt.set_lexi_row(llm, row)
    ref[row] = logits(llm)
llm.close()
llm = open_model(LoadOptions(rpc=a["rpc"], tensor_split=a.get("split"), n_gpu_layers=a["ngl"],
                             prefetch=a.get("prefetch", "off")))
out = {"diff": {}, "log": rt.captured_log(), "buffers": buffers(), "then": [],
       "ref_spread": float(np.abs(ref[a["rows"][0]] - ref[a["rows"][1]]).max())}
for row in a["rows"]:
    rt.set_lexi_row(llm, row)
    out["diff"][str(row)] = float(np.abs(logits(llm) - ref[row]).max())
llm.close()
for spec in a.get("then", []):     # later loads in the same process, every server still registered
    llm = open_model(LoadOptions(rpc=spec, n_gpu_layers=-1))
    rt.set_lexi_row(llm, a["rows"][0])
    out["then"].append({"buffers": buffers(), "diff": float(np.abs(logits(llm) - ref[a["rows"][0]]).max())})
    llm.close()
print("RESULT " + json.dumps(out))
"""
LOSE = r"""
import sys
from lexi_gguf.runtime import llama as rt
from lexi_gguf.runtime.options import LoadOptions
llm = rt.load(sys.argv[1], options=LoadOptions(rpc=sys.argv[2], n_gpu_layers=-1), n_ctx=512, n_threads=1)
print("ready", flush=True)
for _ in range(1000):
    llm.reset()
    llm.eval(list(range(1, 200)))
print("finished", flush=True)
"""


@pytest.fixture(scope="module")
def servers():
    procs, eps = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(rpc.start_server(port=port, threads=1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            eps.append(f"127.0.0.1:{port}")
        yield eps
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _client(model, **args) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-c", CLIENT, json.dumps({"model": str(model), "tokens": TOKENS, **args})],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), r.stderr


def test_layers_split_over_two_servers_match_local_at_every_budget(laddered_gguf, servers):
    out, _ = _client(laddered_gguf, rpc=",".join(servers), split=[1, 1], ngl=-1, rows=[2, ROW_MODEL, 1],
                     then=[servers[1], ""])
    # both servers hold model weights (llama.cpp's loader names each device's buffer: RPC<i>[HOST:PORT])
    def on(buffers):
        return {ep for ep in servers if any(b.startswith("RPC") and b.endswith(f"[{ep}]") for b in buffers)}
    assert on(out["buffers"]) == set(servers), out["log"][-3000:]
    assert out["ref_spread"] > 1e-2            # the budgets really differ, so a wrong row would show
    for row, d in out["diff"].items():
        assert d <= TOL, f"row {row}: max |logit diff| {d} over RPC"
    # the same process, both servers still registered: a load naming the second server uses only it,
    # a load naming none stays here, even with every layer asked to go to a device
    one, none = out["then"]
    assert on(one["buffers"]) == {servers[1]}, one
    assert not [b for b in none["buffers"] if b.startswith("RPC")], none
    assert one["diff"] <= TOL and none["diff"] <= TOL, out["then"]


def test_prefetch_skips_remote_layers_with_one_line(laddered_gguf, servers):
    out, err = _client(laddered_gguf, rpc=servers[0], ngl=2, rows=[ROW_MODEL, 2], prefetch="guess")
    said = [x for x in err.splitlines() if x.startswith("lexi-gguf: prefetch:")]
    assert said == ["lexi-gguf: prefetch: 2 of 4 layers are on RPC servers and are not prefetched (their experts "
                    "live in the servers' memory); the 2 layers held here are"], err[-2000:]
    for row, d in out["diff"].items():
        assert d <= TOL, f"row {row}: max |logit diff| {d} with prefetch on a half-remote model"


def test_server_down_is_a_clear_error(laddered_gguf):
    port = free_port()     # nothing listens there
    r = subprocess.run([sys.executable, "-m", "lexi_gguf.cli", "chat", str(laddered_gguf), "--rpc", f"127.0.0.1:{port}"],
                       input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"no RPC server answers at 127.0.0.1:{port}" in r.stderr and "rpc-server" in r.stderr
    assert "Traceback" not in r.stderr and "GGML_ABORT" not in r.stderr


def test_server_lost_mid_run_exits_with_a_clear_error(laddered_gguf):
    port = free_port()
    server = rpc.start_server(port=port, threads=1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = subprocess.Popen([sys.executable, "-c", LOSE, str(laddered_gguf), f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        time.sleep(0.5)          # mid-run: evaluating on the server
        server.kill()
        server.wait()
        rc = client.wait(timeout=60)
        err = client.stderr.read()
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
    assert rc == rpc.EXIT_RPC_LOST, err[-2000:]
    assert f"with RPC servers 127.0.0.1:{port}" in err and "still running" in err
    assert "finished" not in client.stdout.read()


@pytest.mark.parametrize("spec, error", [
    ("", "names no server"), ("host:port", "expected HOST:PORT"), ("h:70000", "expected HOST:PORT"),
    ("a:1,a:1", "names a server twice")])
def test_bad_endpoints_are_refused(spec, error):
    with pytest.raises(LexiError, match=error):
        rpc.parse_endpoints(spec)


def test_endpoints_parse():
    assert rpc.parse_endpoints("10.0.0.2:5000, box") == ["10.0.0.2:5000", f"box:{rpc.DEFAULT_PORT}"]


def test_trace_over_rpc_records_the_local_experts(laddered_gguf, servers, tmp_path):
    """The eval callback reads tensors computed on the servers (ggml_backend_tensor_get): same trace."""
    import numpy as np
    prompts = tmp_path / "p.txt"
    prompts.write_text("The river flows\nA second prompt\n")
    for name, extra in (("local", []), ("rpc", ["--rpc", servers[1]])):
        r = subprocess.run([sys.executable, "-m", "lexi_gguf.cli", "trace", "run", str(laddered_gguf), "--prompts",
                            str(prompts), "--max-tokens", "4", "--threads", "1", "-o", str(tmp_path / f"{name}.npz"), *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = np.load(tmp_path / "local.npz"), np.load(tmp_path / "rpc.npz")
    assert a["experts"].shape[0] > 8 and (a["experts"] == b["experts"]).all()
    assert np.abs(a["weights"] - b["weights"]).max() <= TOL
