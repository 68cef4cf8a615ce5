"""`lexi-gguf serve --engine llama-server`: llama.cpp's server from the patched tree, every stored budget
a model id (router mode, one child per budget): each id answers as llama-cpp-python does at that budget
(greedy, token for token), concurrent requests on parallel slots all come back with the same answers,
the API key is enforced, bad requests leave it serving, SIGTERM stops it and its children."""
from __future__ import annotations

import concurrent.futures
import configparser
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lexi_gguf.runtime import llama as runtime
from lexi_gguf.serve import llama_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout root: bench/ helpers
from bench.loadgen import free_port, post, wait_until_serving  # noqa: E402

KEY = "test-key"
PROMPT = "The river"
IDS = {"m": {}, "m@full": {"lexi.enable": False}, "m@1": {"lexi.budget_index": 0},
       "m@0.625": {"lexi.budget_index": 1}, "m@0.5": {"lexi.budget_index": 2}}


def _post(base, path, body, key=KEY, raw: bytes | None = None):
    return post(base, path, raw if raw is not None else json.dumps(body).encode(), key, 120)


@pytest.fixture(scope="module")
def router(laddered_gguf, tmp_path_factory):
    model = tmp_path_factory.mktemp("llama-server") / "m.gguf"
    model.symlink_to(laddered_gguf)
    runtime.tool("llama-server")         # built on first use: not inside the start-up deadline below
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lexi_gguf.cli", "serve", str(model), "--engine", "llama-server",
                             "--port", str(port), "--parallel", "2", "--threads", "1", "--ctx", "256",
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, base, KEY, ids=IDS)     # every budget's child loaded
    except RuntimeError as e:
        pytest.fail(str(e))
    yield proc, base, model
    if proc.poll() is None:
        proc.kill()


def _complete(base, mid):
    status, body = _post(base, "/v1/completions", {"model": mid, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    assert body["model"] == mid
    return body["choices"][0]["text"]


def _reference(model, kv) -> str:
    llm = runtime.load(model, kv_overrides=kv or None, n_ctx=256, n_threads=2)
    try:
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, repeat_penalty=1.0)
        return out["choices"][0]["text"]
    finally:
        llm.close()


def test_every_budget_answers_like_the_python_runtime(router):
    _, base, model = router
    got = {mid: _complete(base, mid) for mid in IDS}
    for mid, kv in IDS.items():
        assert got[mid] == _reference(model, kv), mid
    assert len(set(got.values())) >= 3          # the budgets really run different counts


def test_concurrent_requests_on_parallel_slots_all_come_back(router):
    _, base, _ = router
    alone = {mid: _complete(base, mid) for mid in ("m@0.5", "m@full")}
    jobs = ["m@0.5", "m@full"] * 6
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda mid: _complete(base, mid), jobs))
    assert answers == [alone[mid] for mid in jobs]


def test_key_and_bad_requests_leave_it_serving(router):
    _, base, _ = router
    status, _ = _post(base, "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 2}, key=None)
    assert status == 401
    # llama-server's router answers a body that is not JSON with a 500 (upstream; the python engine: 400)
    status, body = _post(base, "/v1/completions", None, raw=b"{not json")
    assert status in (400, 500) and "error" in body, body
    status, body = _post(base, "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": "many"})
    assert 400 <= status < 500, body
    status, body = _post(base, "/v1/completions", {"model": "nope", "prompt": PROMPT, "max_tokens": 2})
    assert 400 <= status < 500, body
    assert _complete(base, "m@0.625")


def test_sigterm_stops_it_and_every_budget_child(router):
    proc, base, _ = router
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == len(IDS)             # one llama-server per model id, under the router
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(1)
    alive = [c for c in children if subprocess.run(["kill", "-0", c], capture_output=True).returncode == 0]
    assert alive == []


def test_one_budget_command_and_router_presets(laddered_gguf, tmp_path):
    cmd, ids = llama_server.command(laddered_gguf, budget="0.5", parallel=3, n_ctx=128, threads=2)
    assert list(ids) == [f"{laddered_gguf.stem}@0.5"]
    joined = " ".join(cmd)
    assert "--override-kv lexi.budget_index=int:2" in joined and "-np 3 -c 384" in joined
    assert f"--alias {laddered_gguf.stem}@0.5" in joined and "--host 127.0.0.1" in joined
    cmd, ids = llama_server.command(laddered_gguf, parallel=2, n_ctx=64, workdir=tmp_path)
    ini = configparser.ConfigParser()
    text = Path(cmd[cmd.index("--models-preset") + 1]).read_text()
    ini.read_string("[top]\n" + text)        # the file opens with `version = 1`, outside any section
    assert ini["top"]["version"] == "1"
    stem = laddered_gguf.stem
    want = {stem: None, f"{stem}@full": "lexi.enable=bool:false", f"{stem}@1": "lexi.budget_index=int:0",
            f"{stem}@0.625": "lexi.budget_index=int:1", f"{stem}@0.5": "lexi.budget_index=int:2"}
    assert set(ini.sections()) == {"top", "*", *want}
    assert ini["*"]["np"] == "2" and ini["*"]["c"] == "128"
    for sec, kv in want.items():
        assert ini[sec]["model"] == str(laddered_gguf.resolve())
        assert ini[sec].get("override-kv") == kv


@pytest.mark.parametrize("extra, error", [(["--parallel", "4"], "for parallel slots and continuous batching use "
                                           "--engine llama-server"),
                                          (["--engine", "llama-server", "--prefetch", "chosen"], "use the python engine")])
def test_engine_options_that_do_not_apply_are_refused(laddered_gguf, extra, error):
    r = subprocess.run([sys.executable, "-m", "lexi_gguf.cli", "serve", str(laddered_gguf), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and error in r.stderr, r.stderr


def test_slot_args_follow_the_options_they_are_given(tmp_path):
    """Devices, split, threads and repacking come from the LoadOptions handed in, nothing process-wide:
    two option sets in one process give two command lines."""
    from lexi_gguf import LexiError
    from lexi_gguf.runtime.options import LoadOptions
    f = tmp_path / "m.gguf"
    f.write_bytes(b"\0" * 64)
    remote = llama_server.slot_args(f, 64, 2, LoadOptions(n_gpu_layers=-1, rpc="10.0.0.2:50052,box",
                                                          tensor_split=[2, 1], repack="off", threads=3))
    assert " ".join(remote) == ("-np 2 -c 128 -t 3 --no-repack -ngl 999 -ts 2,1 "
                                "--rpc 10.0.0.2:50052,box:50052")
    assert llama_server.slot_args(f, 64, 1, LoadOptions(repack="on")) == ["-np", "1", "-c", "64", "-ngl", "0"]
    with pytest.raises(LexiError, match="use the python engine"):
        llama_server.slot_args(f, 64, 1, LoadOptions(prefetch="chosen"))
