"""Per-layer k on ggml's Vulkan backend, every layer offloaded, against the same build's CPU backend.

Run by `make test-vulkan` (bench/vulkan_tests.py), in .venv-vulkan whose runtime is the Vulkan build:
not collected by `make test` (its file name is not test_*.py: the CPU runtime has no Vulkan device,
and the build takes too long for that suite). Here the Vulkan device is Mesa's lavapipe, a conformant
software device on the CPU (GGML_VK_VISIBLE_DEVICES=0 makes ggml use it); on a machine with a GPU the
same tests run on the GPU.

The reference is the same library with no layer offloaded (n_gpu_layers 0, op_offload off: ggml's CPU
backend computes every op): the two runs differ only in the backend path (Vulkan's mul_mat_id, top-k,
views and its own copies of the per-layer counts), which is what per-layer k changes.

Tolerance: the two backends sum in different orders, Vulkan computes f16 weights' products in its own
precision and quantizes activations its own way for Q8_0 weights, so logits differ by rounding even where
per-layer k plays no part (the model's own k, lexi off: 0.002 for f32, 0.03-0.04 for f16 and Q8_0 on
lavapipe, measured: docs/results.md, "Vulkan backend"). A fixed bound cannot tell that noise from a wrong
count, so each check is relative to what a wrong count would do: at the same counts, the smallest max
|logit change| on the CPU from moving any one layer's k by one (`margin`). The Vulkan logits must be
within MARGIN_FRACTION = 1/2 of it of the CPU's: then, by the triangle inequality of the max norm, they
are nearer the CPU's logits at these counts than the CPU's with any one layer's k off by one (the
backend ran these counts, not a neighbour); and the argmax token must agree."""
from __future__ import annotations

import json
import os

os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")   # before ggml registers its backends: lavapipe is a CPU-type device

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.devices import gpu_devices
from lexi_gguf.runtime.options import LoadOptions

from conftest import LADDER, LADDER_DEFAULT, TOKENS

F32 = 0
# a 12-token batch (mul_mat_id), then 3 one-token steps (mat-vec id); ids below the built-in model's vocabulary of 4096
PROMPT, DECODE = [t % 4096 for t in TOKENS[:12]], [t % 4096 for t in TOKENS[12:15]]
ALL = 99
# max |logit diff| allowed, as a fraction of the margin (docstring; the measured values in docs/results.md)
MARGIN_FRACTION = 0.5
# the built-in model (trained, 6 layers, 16 experts, k 4) with a default and a ladder
MIX_DEFAULT = [3, 1, 4, 2, 4, 2]
MIX_LADDER = {1.0: [4] * 6, 0.75: [2, 4, 3, 3, 4, 2], 0.5: [2, 1, 3, 2, 2, 2]}
MEASURED: list[dict] = []


def _record(test: str, model: str, **values) -> None:
    MEASURED.append({"test": test, "model": model, "margin_fraction": MARGIN_FRACTION, **values})


@pytest.fixture(scope="module", autouse=True)
def _save_measurements():
    yield
    out = os.environ.get("LEXI_VULKAN_MEASURE")
    if out:
        with open(out, "a") as f:
            for m in MEASURED:
                f.write(json.dumps(m) + "\n")


@pytest.fixture(scope="module")
def device():
    devs = [d for d in gpu_devices() if d["backend"] == "Vulkan"]
    assert devs, "no Vulkan device registered: is this the Vulkan runtime, with GGML_VK_VISIBLE_DEVICES=0 on lavapipe?"
    return devs[0]


@pytest.fixture(scope="module")
def builtin_ggufs(workdir, llama_cpp_dir):
    """The built-in trained Mixtral as f16 and Q8_0 files (its experts' rows, 192, are whole Q8_0 blocks),
    each with a default and a ladder of three budgets."""
    from lexi_gguf.export.hf_to_gguf import convert_to_gguf
    from lexi_gguf.gguf.reader import model_info
    from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
    from lexi_gguf.testbeds.builtin import ensure_default_model
    hf = ensure_default_model(log=lambda *a: None)
    out = {}
    for t in ("f16", "q8_0"):
        plain = convert_to_gguf(hf, workdir / f"builtin-{t}.gguf", llama_cpp_dir, outtype=t)
        ladder = [{"budget": b, "total": sum(c), "expert_used_count": c} for b, c in MIX_LADDER.items()]
        md = lexi_metadata(model_info(plain), MIX_DEFAULT, "manual", ladder=ladder)
        out[t] = copy_with_metadata(plain, workdir / f"builtin-{t}-ladder.gguf", md, progress=False)
    return out


MODELS = {"qwen3_moe-f32": ("f32", LADDER_DEFAULT, LADDER), "builtin-f16": ("f16", MIX_DEFAULT, MIX_LADDER),
          "builtin-q8_0": ("q8_0", MIX_DEFAULT, MIX_LADDER)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, laddered_gguf, builtin_ggufs):
    name = request.param
    wtype, default, ladder = MODELS[name]
    path = laddered_gguf if name == "qwen3_moe-f32" else builtin_ggufs[wtype]
    return {"name": name, "path": path, "default": default, "ladder": ladder}


def _load(path, ngl: int, **kv):
    return runtime.load(path, kv_overrides=kv or None, n_ctx=64, logits_all=True, n_threads=2, n_gpu_layers=ngl,
                        type_k=F32, type_v=F32, op_offload=ngl != 0)


def _logits(llm, prompt=PROMPT, decode=DECODE):
    llm.reset()
    llm.eval(prompt)
    for t in decode:
        llm.eval([t])
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def _fresh(path, ngl: int, **kv):
    llm = _load(path, ngl, **kv)
    try:
        return _logits(llm), runtime.n_expert_active(llm)
    finally:
        llm.close()


def _rows(m):
    """(label, set_lexi_row row, load-time kv overrides, counts) for every stored budget."""
    n = len(m["default"])
    full = [max(c for r in m["ladder"].values() for c in r)] * n
    out = [("model k", runtime.ROW_MODEL, {"lexi.enable": False}, full), ("default", runtime.ROW_LOADED, {}, m["default"])]
    out += [(f"row {i} (budget {b:g})", i, {"lexi.budget_index": i}, c) for i, (b, c) in enumerate(m["ladder"].items())]
    return out


_CPU: dict = {}
_MARGINS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_cpu_models():
    yield
    for llm in _CPU.values():
        llm.close()
    _CPU.clear()


def margin(path, counts: list[int], prompt=PROMPT, decode=DECODE) -> float:
    """The smallest max |logit change| (CPU) from moving one layer's k by one from these counts: what a
    backend that got a single layer's count wrong would show at the least."""
    key = (str(path), tuple(counts), tuple(prompt), tuple(decode))
    if key not in _MARGINS:
        llm = _CPU.get(str(path)) or _CPU.setdefault(str(path), _load(path, 0))
        runtime.set_expert_counts(llm, counts)
        base = _logits(llm, prompt, decode)
        out = []
        for j in range(len(counts)):
            c = list(counts)
            c[j] += -1 if c[j] > 1 else 1
            runtime.set_expert_counts(llm, c)
            out.append(float(np.abs(_logits(llm, prompt, decode) - base).max()))
        _MARGINS[key] = min(out)
    return _MARGINS[key]


def _check(got, ref, path, counts, what, prompt=PROMPT, decode=DECODE):
    """max |logit diff| Vulkan vs CPU, and it over the margin at these counts (asserted below MARGIN_FRACTION)."""
    d = float(np.abs(got - ref).max())
    m = margin(path, counts, prompt, decode)
    assert d <= MARGIN_FRACTION * m, (f"{what}: max |logit diff| Vulkan vs CPU {d:.3g} > {MARGIN_FRACTION} x "
                                      f"{m:.3g}, the least change from one layer's k moved by one")
    assert (got.argmax(-1) == ref.argmax(-1)).all(), f"{what}: argmax differs"
    return d, d / m


def test_the_device_holds_every_layer(device, laddered_gguf, capsys):
    from lexi_gguf import cli
    llm = _load(laddered_gguf, ALL)
    log = runtime.captured_log()
    llm.close()
    assert f"{device['name']} model buffer size" in log, log[-2000:]
    assert "offloaded 5/5 layers to GPU" in log, log[-2000:]        # 4 blocks and the output layer
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"GPU devices (--n-gpu-layers): {device['name']} ({device['description']})" in out
    _record("device", "-", device=device["description"], backend=device["backend"])


def test_stored_budgets_match_cpu(device, model):
    """Each stored budget chosen at load (lexi.budget_index / lexi off / the default)."""
    diffs = {}
    for label, _, kv, counts in _rows(model):
        ref, k_ref = _fresh(model["path"], 0, **kv)
        got, k_got = _fresh(model["path"], ALL, **kv)
        assert k_got == k_ref == counts, label
        diffs[label] = _check(got, ref, model["path"], counts, f"{model['name']} {label}")
    _record("stored budgets", model["name"], max_diff=max(d for d, _ in diffs.values()),
            of_margin=max(r for _, r in diffs.values()), rows=len(diffs), lexi_off_diff=diffs["model k"][0])


def test_budget_switch_matches_cpu(device, model):
    """One offloaded load switched through every row and back (llama_lexi_set_row), each row against a
    fresh CPU load at that budget; a one-token batch before and after a switch (same graph shape)."""
    rows = _rows(model)
    refs = {label: _fresh(model["path"], 0, **kv)[0] for label, _, kv, _ in rows}
    llm = _load(model["path"], ALL)
    diffs = []
    try:
        for label, row, _, counts in [*rows[::-1], *rows]:       # down and up again
            runtime.set_lexi_row(llm, row)
            assert runtime.lexi_row(llm) == row
            diffs.append(_check(_logits(llm), refs[label], model["path"], counts, f"{model['name']} switched to {label}"))
        runtime.set_lexi_row(llm, rows[0][1])
        a = _logits(llm, [PROMPT[0]], [])
        runtime.set_lexi_row(llm, rows[-1][1])
        b = _logits(llm, [PROMPT[0]], [])
    finally:
        llm.close()
    one = _load(model["path"], 0, **rows[-1][2])
    ref_b = _logits(one, [PROMPT[0]], [])
    one.close()
    diffs.append(_check(b, ref_b, model["path"], rows[-1][3], "one token after a switch", [PROMPT[0]], []))
    assert np.abs(a - b).max() > 4 * diffs[-1][0]      # the two rows really differ on this token
    _record("budget switch", model["name"], max_diff=max(d for d, _ in diffs), of_margin=max(r for _, r in diffs),
            switches=len(diffs) - 1)


def test_custom_counts_match_cpu(device, model):
    """Counts no row stores (llama_lexi_set_counts), on one offloaded load, against the CPU's."""
    n, top = len(model["default"]), max(model["ladder"][1.0])
    # the last: the first layer below the others (single-token decode crashed lavapipe so: docs/backends.md)
    custom = [[1] * n, [top] * n, [(j % top) + 1 for j in range(n)], [top - (j % top) for j in range(n)],
              [2] + [top] * (n - 1)]
    cpu, vk = _load(model["path"], 0), _load(model["path"], ALL)
    diffs = []
    try:
        for counts in custom:
            runtime.set_expert_counts(cpu, counts)
            runtime.set_expert_counts(vk, counts)
            assert runtime.lexi_row(vk) == runtime.ROW_CUSTOM
            diffs.append(_check(_logits(vk), _logits(cpu), model["path"], counts, f"{model['name']} counts {counts}"))
    finally:
        cpu.close()
        vk.close()
    _record("custom counts", model["name"], max_diff=max(d for d, _ in diffs), of_margin=max(r for _, r in diffs),
            counts=len(custom), one_layer_k_change_min=min(margin(model["path"], c) for c in custom))


def test_partial_offload_matches_cpu(device, laddered_gguf):
    """Half the blocks on the device, half on the CPU: the per-layer counts follow each layer."""
    diffs = []
    for row, kv in ((runtime.ROW_LOADED, {}), (2, {"lexi.budget_index": 2})):
        ref, _ = _fresh(laddered_gguf, 0, **kv)
        got, k = _fresh(laddered_gguf, 2, **kv)
        assert k == (LADDER_DEFAULT if not kv else LADDER[0.5])
        diffs.append(_check(got, ref, laddered_gguf, k, f"2 of 4 blocks offloaded, row {row}"))
    _record("partial offload", "qwen3_moe-f32", max_diff=max(d for d, _ in diffs), of_margin=max(r for _, r in diffs))


def test_prefetch_and_repack_say_they_do_not_reach_the_device(device, laddered_gguf, capfd):
    """Prefetch (madvise on the mapped file) and repacking concern weights held on the CPU: with every
    layer on the device they are accepted, said once to do nothing there, and change no logit; the expert
    cache, which manages the mapped file's experts, is refused."""
    ref, _ = _fresh(laddered_gguf, ALL)
    capfd.readouterr()
    llm = runtime.load(laddered_gguf, n_ctx=64, logits_all=True, n_threads=2, n_gpu_layers=ALL, type_k=F32, type_v=F32,
                       prefetch="guess", repack="on")
    try:
        assert runtime.prefetch_mode(llm) == "guess"
        got = _logits(llm)
    finally:
        llm.close()
    err = capfd.readouterr().err
    said = [x for x in err.splitlines() if x.startswith("lexi-gguf: ")]
    assert said == [f"lexi-gguf: prefetch: 4 of 4 layers are on {device['name']} ({device['description']}) and are not "
                    "prefetched (their experts live in the device's memory); it has nothing to do",
                    f"lexi-gguf: --repack on: 4 of 4 layers are on {device['name']} ({device['description']}), in the "
                    "device's own layouts; it applies to the weights kept on the CPU (0 of 4 layers, and the token "
                    "embeddings)"], err[-2000:]
    assert np.abs(got - ref).max() <= 1e-6
    with pytest.raises(LexiError, match="--expert-cache: it offloads layers"):
        runtime.load(laddered_gguf, options=LoadOptions(n_gpu_layers=ALL, expert_cache="1M"))
    _record("prefetch/repack with offload", "qwen3_moe-f32", max_diff=float(np.abs(got - ref).max()))
