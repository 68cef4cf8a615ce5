"""The runtime expert cache (runtime.expertcache, issue 30): it only moves bytes, so outputs are
bit-identical; routed-expert memory (mincore on the expert tensors) stays within SIZE + 5 % after a
decode; eviction follows the policy on scripted routing; a SIZE below one token's experts is refused in
one line; and routing replay and the cache share the one routing hook (the cache sees the replayed ids).
Counts, not time: a 2-layer, 16-expert OLMoE-shaped file (6.4 MiB experts, Q8_0)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.measure.memlimit.pagecache import evict
from lexi_gguf.runtime import expertmap as xm
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.expertcache import parse_size
from lexi_gguf.runtime.options import LoadOptions
from lexi_gguf.runtime.trace import record
from lexi_gguf.runtime.tracefile import Trace
from lexi_gguf.testbeds import shapes, synth

from conftest import greedy_logits

K, E = 8, 16


@pytest.fixture(scope="module")
def model():
    return synth.synth(shapes.reduced(shapes.get("olmoe-1b-7b"), 2, E), "Q8_0", progress=False)["path"]


@pytest.fixture(scope="module")
def expert_bytes(model):
    lay = xm.layout(model)
    assert lay.expert_bytes[0] == lay.expert_bytes[1]
    return lay.expert_bytes[0]


@pytest.mark.parametrize("policy", ["lru", "nextuse", "lfu"])
def test_outputs_are_bit_identical_with_the_cache(model, expert_bytes, policy):
    llm, ref = greedy_logits(model, LoadOptions())
    llm.close()
    llm, got = greedy_logits(model, LoadOptions(expert_cache=str(20 * expert_bytes), cache_policy=policy))
    s = llm._lexi_expert_cache.summary()
    llm.close()
    assert np.array_equal(ref, got)
    assert s["evictions"] > 0 and s["hits"] > 0 and s["policy"] == policy


def test_resident_expert_bytes_stay_within_the_size(model, expert_bytes):
    lay = xm.layout(model)
    total = sum(b * E for b in lay.expert_bytes)
    size = 18 * expert_bytes                    # one token's experts (2 x 8) and two more: 56 % of the experts
    evict(model)
    llm, _ = greedy_logits(model, LoadOptions(expert_cache=str(size), cache_policy="lru"), n=8)
    cache = llm._lexi_expert_cache
    resident = cache.resident_expert_bytes()
    s = cache.summary()
    llm.close()
    assert s["evictions"] > 0 and s["tokens"] >= 8
    assert resident <= 1.05 * size, (resident, size)
    assert s["admitted_bytes"] > 0.9 * size                    # warm: what the load mapped in, up to SIZE
    assert resident >= 0.9 * s["admitted_bytes"]          # what it admitted is really in memory
    # without the cache llama.cpp's load maps every expert in (MAP_POPULATE): the cache is what bounds it
    evict(model)
    llm = runtime.load(model, n_ctx=64, n_threads=2)
    base = (xm.mapping_bases(model)).pop()
    llm.eval(llm.tokenize(b"The quick"))
    stock = xm.resident_total(base, lay.ranges)
    llm.close()
    assert stock > 1.05 * size and stock > 0.9 * total


def _scripted(model, rows: list[list[list[int]]]) -> Trace:
    """A trace naming each token's experts in each MoE layer (best first)."""
    lay = xm.layout(model)
    T, L = len(rows), len(lay.moe_layers)
    experts = np.array(rows, np.int16)
    w = np.full((T, L, K), 1.0 / K, np.float32)
    return Trace(np.zeros(T, np.int32), np.zeros(T, bool), np.zeros(T, np.int32), np.array(lay.moe_layers, np.int32),
                 np.full(L, K, np.int32), experts, w, None, {"n_expert": E, "model": "scripted"})


def _resident_fraction(cache, j: int, e: int) -> float:
    spans = cache.lay.spans(j, e)
    return xm.resident_in(cache.base, spans) / sum(n for _, n in spans)


def test_eviction_follows_lru_on_scripted_routing(model, expert_bytes):
    """20 slots; token 0 fills 16; token 1 adds 4 in layer 0; token 2 needs 4 new in layer 0 (LRU's victims:
    layer 0's experts 4-7, untouched since token 0) and 8 new in layer 1 (victims: layer 0's 8-11, then
    layer 1's 0-3: least recently used, never one the running layer needs)."""
    a, b = list(range(8)), list(range(8, 16))
    script = _scripted(model, [[a, a], [[0, 1, 2, 3, 8, 9, 10, 11], a], [[12, 13, 14, 15, 0, 1, 2, 3], b]])
    llm = runtime.load(model, n_ctx=64, n_threads=2, options=LoadOptions(expert_cache=str(20 * expert_bytes),
                                                                         cache_policy="lru"))
    from lexi_gguf.runtime.replay import for_model
    rp = for_model(llm, model, script)
    cache = llm._lexi_expert_cache
    cache.clear()                                # from empty (the load's pages were admitted as a warm start)
    for tok in (464, 2068, 7586):                # one token a ubatch: one trace row each
        llm.eval([tok])
    rp.check()
    cache.check()
    assert cache.stats["tokens"] == 3 and cache.stats["evictions"] == 12
    want = {0: {0, 1, 2, 3, 12, 13, 14, 15}, 1: set(range(4, 16))}
    for j in (0, 1):
        frac = {e: _resident_fraction(cache, j, e) for e in range(E)}
        assert {e for e, f in frac.items() if f > 0.95} == want[j], (j, frac)
        assert all(f < 0.05 for e, f in frac.items() if e not in want[j]), (j, frac)
    llm.close()


def test_replay_and_the_cache_share_the_hook(model, expert_bytes, tmp_path):
    """Replay rewrites the ids, then the cache sees the final ones: a trace of the run is the script, and
    what the cache admitted is the script's experts."""
    rng = np.random.default_rng(0)
    rows = [[sorted(rng.permutation(E)[:K].tolist()) for _ in range(2)] for _ in range(6)]
    script = _scripted(model, rows)
    got = record(model, tokens=[[464, 2068, 7586, 21831, 18045, 625]], progress=False, no_lexi=True,
                 options=LoadOptions(expert_cache=str(20 * expert_bytes)), replay=script)
    assert (got.experts == script.experts).all()
    llm = runtime.load(model, n_ctx=64, n_threads=2, options=LoadOptions(expert_cache=str(20 * expert_bytes),
                                                                         cache_policy="lru"))
    from lexi_gguf.runtime.replay import for_model
    rp = for_model(llm, model, script)
    hooks = llm._lexi_routing_hooks
    assert [o for o, _ in hooks.clients] == [0, 10]            # replay first, then the cache
    cache = llm._lexi_expert_cache
    cache.clear()
    llm.eval([464])                                            # one token: row 0
    cache.check()                                              # the worker has caught up
    assert set(cache.pol.d) == {j * E + e for j in (0, 1) for e in rows[0][j]}
    rp.remove()
    assert [o for o, _ in hooks.clients] == [10]               # the cache stays on the router's routing
    llm.eval([2068])
    cache.check()
    assert cache.stats["tokens"] == 2
    llm.close()


def test_a_size_below_one_token_is_refused_in_one_line(model, expert_bytes, capsys):
    with pytest.raises(LexiError, match="below one token's experts"):
        runtime.load(model, n_ctx=64, n_threads=2, options=LoadOptions(expert_cache=str(10 * expert_bytes)))
    assert parse_size("3.5GiB") == int(3.5 * 2**30) and parse_size("4G") == 4 * 2**30 and parse_size("auto") == "auto"
    for bad, msg in [(dict(expert_cache="4X"), "give a size such as 4G"),
                     (dict(cache_policy="lru"), "needs --expert-cache"),
                     (dict(expert_cache="4G", prefetch="chosen"), "leave out --prefetch"),
                     (dict(expert_cache="4G", n_gpu_layers=1), "offloads layers"),
                     (dict(expert_cache="4G", repack="on"), "repacked")]:
        with pytest.raises(LexiError, match=msg):
            LoadOptions(**bad)
    capsys.readouterr()
    assert cli.main(["bench", str(model), "--n-prompt", "8", "--n-gen", "2", "--reps", "1", "--expert-cache", "10M"]) != 0
    err = capsys.readouterr().err
    assert "below one token's experts" in err and "Traceback" not in err


def test_bench_reports_the_cache(model, expert_bytes, tmp_path):
    js = tmp_path / "b.json"
    assert cli.main(["bench", str(model), "--n-prompt", "8", "--n-gen", "4", "--reps", "1", "--expert-cache",
                     str(20 * expert_bytes), "--cache-policy", "lru", "--json", str(js)]) == 0
    row = json.loads(js.read_text())["rows"][0]
    c = row["expert_cache"]
    assert c["policy"] == "lru" and c["tokens"] > 0 and 0 <= c["hit_rate"] <= 1 and c["mb_asked_per_token"] > 0
    assert c["resident_expert_bytes"] <= 1.05 * c["size_bytes"]


def test_a_warm_start_keeps_what_the_load_mapped_in_up_to_the_size(model, expert_bytes):
    """llama.cpp's load maps every expert in; the cache admits them up to SIZE (mincore) and drops the rest,
    so memory is within SIZE before the first token, and that token finds hits."""
    size = 18 * expert_bytes
    llm = runtime.load(model, n_ctx=64, n_threads=2, options=LoadOptions(expert_cache=str(size), cache_policy="lru"))
    cache = llm._lexi_expert_cache
    assert cache.used == size and len(cache.pol) == 18
    assert cache.resident_expert_bytes() <= 1.05 * size
    llm.eval([464])
    cache.check()
    assert cache.stats["hits"] > 0
    llm.close()


def test_pages_no_admitted_expert_covers_are_dropped(model, expert_bytes):
    """Pages of the expert tensors that no admitted expert covers (the kernel's read-ahead reaches into them
    from outside; a buffered read here, which the kernel reads in large folios that straddle admitted and
    not-admitted experts) are dropped by the next run of their layer (the scrub), admitted experts stay,
    and resident expert memory is back within SIZE + 1 %."""
    import os
    size = 18 * expert_bytes
    evict(model)
    llm = runtime.load(model, n_ctx=64, n_threads=2, options=LoadOptions(expert_cache=str(size), cache_policy="lru"))
    cache = llm._lexi_expert_cache
    llm.eval([464])
    cache.io.flush()
    assert cache.resident_expert_bytes() <= 1.01 * size
    lay = cache.lay
    fd = os.open(model, os.O_RDONLY)
    try:
        for off, n in lay.ranges:                   # every expert tensor read through the page cache
            for o in range(off, off + n, 1 << 20):
                os.pread(fd, 1 << 20, o)
    finally:
        os.close(fd)
    assert cache.resident_expert_bytes() > 1.5 * size      # the strays are there
    llm.eval([2068])                                        # each MoE layer runs once more: its tensors scrubbed
    resident = cache.resident_expert_bytes()
    s = cache.summary()
    for j in range(len(lay.moe_layers)):
        for e in range(E):
            frac = _resident_fraction(cache, j, e)
            if j * E + e in cache.pol:
                assert frac > 0.99, (j, e, frac)
            else:
                assert frac < 0.01, (j, e, frac)
    llm.close()
    assert resident <= 1.01 * size, (resident, size)
    assert s["stray_bytes"] > size and s["scrubs"] >= len(lay.ranges)


def test_per_layer_quotas_follow_k(model, expert_bytes):
    """POLICY:k splits SIZE into per-layer byte budgets in proportion to k x expert bytes (the simulators'
    quota split, runtime.policies.split_quota): a layer running half the experts gets a third of SIZE
    here, and each layer's experts stay within its own budget (victims from its own pool only)."""
    from lexi_gguf.runtime.expertcache import ExpertCache
    from lexi_gguf.runtime.policies import split_quota
    assert split_quota(10, [1, 2, 2]) == [2, 4, 4] and sum(split_quota(1001, [3, 5, 7])) == 1001
    size = 24 * expert_bytes
    before = xm.mapping_bases(model)
    llm = runtime.load(model, n_ctx=64, n_threads=2)
    base = (xm.mapping_bases(model) - before).pop()
    cache = ExpertCache(llm, model, size, "lru:k", base, counts=[4, 8], quiet=True).install()
    assert cache.budget == split_quota(size, [4 * expert_bytes, 8 * expert_bytes]) and cache.budget[0] == 8 * expert_bytes
    for tok in (464, 2068, 7586, 21831):
        llm.eval([tok])
        cache.check()
        assert all(u <= b for u, b in zip(cache.used_by, cache.budget)), (cache.used_by, cache.budget)
    s = cache.summary()
    assert len(cache.pol.pools[0]) == 8 and len(cache.pol.pools[1]) == 16      # each layer's pool full
    assert s["evictions"] > 0 and s["resident_expert_bytes"] <= 1.01 * size
    cache.close()
    llm.close()


def test_a_split_set_is_cached_across_its_shards(model, expert_bytes, tmp_path):
    """A GGUF split by llama-gguf-split (as big MoEs are downloaded): llama.cpp maps each shard on its own;
    the cache manages the experts of every shard, outputs bit-identical, memory within SIZE."""
    import subprocess
    from lexi_gguf.runtime.llama import tool
    subprocess.run([str(tool("llama-gguf-split")), "--split", "--split-max-tensors", "7", str(model),
                    str(tmp_path / "m")], check=True, capture_output=True)
    first = sorted(tmp_path.glob("m-00001-of-*.gguf"))[0]
    lay = xm.layout(first)
    assert len(lay.files) >= 3 and len({lay.file_of(off) for off, _ in lay.ranges}) >= 2   # experts in 2+ shards
    size = 20 * expert_bytes
    llm, ref = greedy_logits(model, LoadOptions())
    llm.close()
    llm, got = greedy_logits(first, LoadOptions(expert_cache=str(size), cache_policy="lru"))
    cache = llm._lexi_expert_cache
    resident, s = cache.resident_expert_bytes(), cache.summary()
    llm.close()
    assert np.array_equal(ref, got)
    assert s["evictions"] > 0 and s["hits"] > 0 and len(cache.files.bases) == len(lay.files)
    assert 0.9 * s["admitted_bytes"] <= resident <= 1.05 * size, (resident, size)
