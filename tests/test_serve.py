"""`lexi-gguf serve` with a real OpenAI client, on a free loopback port: every stored budget is a model
id of one loaded model; answers equal a fresh load at that budget token for token (temperature 0),
also after switching back and forth; bad requests get a 4xx JSON error and the server keeps serving;
concurrent requests queue and all come back; the API key is enforced; SIGTERM shuts it down."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lexi_gguf.runtime import llama as runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout root: bench/ helpers
from bench.loadgen import free_port, wait_until_serving  # noqa: E402

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Tell me about the river."}]
GREEDY = dict(temperature=0.0, max_tokens=8)
NO_PENALTY = {"repeat_penalty": 1.0}
ID_KV = {"m": {}, "m@full": {"lexi.enable": False}, "m@1": {"lexi.budget_index": 0},
         "m@0.625": {"lexi.budget_index": 1}, "m@0.5": {"lexi.budget_index": 2}}


@pytest.fixture(scope="module")
def server(laddered_gguf, tmp_path_factory):
    model = tmp_path_factory.mktemp("serve") / "m.gguf"
    model.symlink_to(laddered_gguf)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from lexi_gguf.cli import main; sys.exit(main(sys.argv[1:]))",
                             "serve", str(model), "--port", str(port), "--threads", "2", "--ctx", "512",
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, base, KEY)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield proc, base, model
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server[1] + "/v1", api_key=KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(server):
    """What a fresh load at each budget answers (chat and completion), computed once."""
    ref = {}
    for mid, kv in ID_KV.items():
        llm = runtime.load(server[2], kv_overrides=kv or None, n_ctx=512, n_threads=2)
        chat = llm.create_chat_completion(messages=MESSAGES, **GREEDY, **NO_PENALTY)
        comp = llm.create_completion("The river", **GREEDY, **NO_PENALTY)
        ref[mid] = (chat["choices"][0]["message"]["content"], comp["choices"][0]["text"])
        llm.close()
    return ref


def _chat(client, mid, stream=False):
    r = client.chat.completions.create(model=mid, messages=MESSAGES, stream=stream, extra_body=NO_PENALTY, **GREEDY)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


def test_every_budget_is_a_model_id(client):
    assert [m.id for m in client.models.list()] == list(ID_KV)


def test_answers_equal_a_fresh_load_at_that_budget(client, reference):
    answers = {mid: ref[0] for mid, ref in reference.items()}
    assert len(set(answers.values())) > 1, "budgets should change the answer of this model"
    # back and forth: a prefix cached at another budget must not be reused
    for mid in ["m@0.5", "m@full", "m", "m@0.5", "m@0.625", "m@1", "m@0.625"]:
        assert _chat(client, mid) == answers[mid], mid
    for mid in ["m@0.625", "m@full"]:
        assert _chat(client, mid, stream=True) == answers[mid], mid
        r = client.completions.create(model=mid, prompt="The river", extra_body=NO_PENALTY, **GREEDY)
        assert r.choices[0].text == reference[mid][1], mid


def test_a_request_may_name_any_counts(client, reference):
    # m@k=4,4,4,4 is the model's own k everywhere: the answer of m@full, with no row for it in the file
    assert _chat(client, "m@k=4,4,4,4") == reference["m@full"][0]
    assert _chat(client, "m@k=2,1,4,1") == reference["m@0.5"][0]      # the 0.5 row's counts, given by hand
    from openai import BadRequestError
    with pytest.raises(BadRequestError) as e:
        _chat(client, "m@k=4,9,4,4")
    assert "block 1: k 9 does not fit: give 1..8" in e.value.response.text
    assert _chat(client, "m") == reference["m"][0]


def test_concurrent_requests_queue_and_none_is_lost(client, reference):
    ids = ["m@0.5", "m@full", "m@0.625", "m"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda mid: _chat(client, mid), ids, timeout=240))
    assert got == [reference[mid][0] for mid in ids]


def _post(base, path, body: bytes, key=KEY):
    req = urllib.request.Request(base + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_json_errors_and_the_server_goes_on(server, client, reference):
    base = server[1]
    status, body = _post(base, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(base, "/v1/chat/completions", json.dumps({"model": "m"}).encode())   # no messages
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _post(base, "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": "many"}).encode())
    assert status == 422 and body["error"]["param"] == "max_tokens"
    huge = {"model": "m@0.5", "messages": [{"role": "user", "content": "river " * 2000}], "max_tokens": 4}
    status, body = _post(base, "/v1/chat/completions", json.dumps(huge).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = _post(base, "/v1/chat/completions", json.dumps({"model": "m@0.3", "messages": MESSAGES}).encode())
    assert status == 404 and "m@0.625" in json.dumps(body)
    # what the OpenAI API refuses is refused here too, naming the field (llama-cpp-python takes all three)
    for field, value in (("temperature", -5), ("max_tokens", -3), ("n", 5), ("top_logprobs", 99)):
        status, body = _post(base, "/v1/chat/completions",
                             json.dumps({"model": "m", "messages": MESSAGES, field: value}).encode())
        assert status == 400 and body["error"]["param"] == field, (field, body)
        assert f"{field} is {value}" in body["error"]["message"]
    # top_p above 1: llama-cpp-python's own schema refuses it first (422), naming the field too
    status, body = _post(base, "/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES, "top_p": 1.5}).encode())
    assert status == 422 and body["error"]["param"] == "top_p", body
    status, body = _post(base, "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, _ = _post(base, "/v1/chat/completions", json.dumps({"model": "m", "messages": MESSAGES}).encode(), key=None)
    assert status == 401
    assert _chat(client, "m@0.5") == reference["m@0.5"][0]


def test_sigterm_shuts_down_cleanly(server, client):
    proc = server[0]
    client.models.list()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stdout.read()
    out = proc.stdout.read()
    assert "serving m.gguf at http://127.0.0.1:" in out and "lexi-gguf serve: stopped (SIGTERM)" in out
