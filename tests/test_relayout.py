"""export.relayout: experts permuted within each MoE layer (router rows, biases and expert slices
together) compute the same model, keep expert groups, store the permutation, rewrite every shard of a
split set; the co-activation order puts experts used together side by side; bad input is refused."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.export import relayout as rl
from lexi_gguf.gguf import keys
from lexi_gguf.gguf.reader import field_value, model_info, open_reader
from lexi_gguf.runtime.trace import Trace

from conftest import f32_logits


def _random_orders(path, seed=0):
    info = model_info(path)
    r = open_reader(path)
    groups = int(field_value(r, f"{info.arch}.expert_group_count") or 1)
    size = info.expert_count // groups
    rng = np.random.default_rng(seed)
    return {b: np.concatenate([g * size + rng.permutation(size) for g in range(groups)]) for b in info.moe_layers}


# deepseek_v3: expert groups, exp_probs_b, shared experts; gpt_oss: router and expert biases
@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_permuted_experts_compute_the_same_model(arch, tiny_gguf, tmp_path):
    src = tiny_gguf(arch)
    orders = _random_orders(src)
    out = rl.relayout(src, tmp_path / "perm.gguf", orders, progress=False)
    a, b = open_reader(src), open_reader(out)
    E = model_info(src).expert_count
    moved = 0
    for x, y in zip(a.tensors, b.tensors):
        m = rl.PER_EXPERT.match(x.name)
        want = np.asarray(x.data)
        if m and want.shape[0] == E:
            want, moved = want[orders[int(m.group(1))]], moved + 1
        assert np.array_equal(np.asarray(y.data), want), x.name
    assert moved >= 3 * len(orders)                 # at least router + gate/up/down of every MoE layer
    stored = rl.stored_order(b, model_info(src).block_count, E)
    assert all(np.array_equal(stored[blk], o) for blk, o in orders.items())
    x, y = f32_logits(src), f32_logits(out)
    assert np.abs(x - y).max() <= 1e-4 * np.abs(x).max() and (x.argmax(1) == y.argmax(1)).all()


def _trace(experts: np.ndarray, n_expert: int) -> Trace:
    T, L, k = experts.shape
    return Trace(np.zeros(T, np.int32), np.zeros(T, bool), np.zeros(T, np.int32), np.arange(L, dtype=np.int32),
                 np.full(L, k, np.int32), experts.astype(np.int16), np.ones((T, L, k), np.float32),
                 meta={"n_expert": n_expert})


def test_coactivation_order_puts_experts_used_together_side_by_side():
    rng = np.random.default_rng(1)
    E, pairs = 16, [(3, 11), (5, 9), (0, 14), (7, 2)]
    rows = []
    for _ in range(300):               # each token: two of the fixed pairs, plus one random expert
        a, b = rng.choice(len(pairs), 2, replace=False)
        rows.append([*pairs[a], *pairs[b], int(rng.integers(E))])
    tr = _trace(np.array(rows)[:, None, :], E)
    order = rl.coactivation_orders(tr)[0]
    assert sorted(order.tolist()) == list(range(E))
    pos = {int(e): i for i, e in enumerate(order)}
    assert all(abs(pos[a] - pos[b]) == 1 for a, b in pairs)
    assert rl.adjacency(tr, {0: order}) > 2 * rl.adjacency(tr)
    # with 2 expert groups (ids 0-7, 8-15) every expert stays in its group
    grouped = rl.coactivation_orders(tr, n_group=2)[0]
    assert set(grouped[:8].tolist()) == set(range(8)) and set(grouped[8:].tolist()) == set(range(8, 16))


def test_relayout_from_a_trace_and_bad_input(tiny_gguf, tmp_path, capsys):
    from lexi_gguf.runtime.trace import record
    src = tiny_gguf("deepseek_v3")
    tr = record(src, prompts=["The quick brown fox"], max_new_tokens=6, progress=False, threads=2)
    tr.save(tmp_path / "t.npz")
    from lexi_gguf import cli
    assert cli.main(["relayout", str(src), "--trace", str(tmp_path / "t.npz"), "-o", str(tmp_path / "coact.gguf")]) == 0
    out = tmp_path / "coact.gguf"
    assert cli.main(["inspect", str(out)]) == 0 and "co-activation order" in capsys.readouterr().out
    orders = rl.coactivation_orders(tr, n_group=2)
    stored = rl.stored_order(open_reader(out), model_info(src).block_count, tr.n_expert)
    assert all(np.array_equal(stored[b], o) for b, o in orders.items())
    # a new allocation written into the re-laid-out file keeps its expert order
    k = ",".join("2" if b in orders else "0" for b in range(model_info(src).block_count))
    assert cli.main(["apply", str(out), "-o", str(tmp_path / "k2.gguf"), "--k", k]) == 0
    assert field_value(open_reader(tmp_path / "k2.gguf"), keys.EXPERT_ORDER) == field_value(open_reader(out), keys.EXPERT_ORDER)
    # the new file routes the same tokens to the same experts under their new ids
    tr2 = record(out, prompts=["The quick brown fox"], max_new_tokens=6, progress=False, threads=2)
    assert np.array_equal(tr2.tokens, tr.tokens)
    for j, blk in enumerate(tr.moe_layers):
        assert np.array_equal(stored[blk][tr2.experts[:, j]], tr.experts[:, j])

    other = tiny_gguf("qwen3_moe")
    with pytest.raises(LexiError, match="record the trace on this file"):
        rl.relayout_from_trace(other, tmp_path / "x.gguf", tmp_path / "t.npz", progress=False, log=lambda s: None)
    bad = {blk: np.arange(tr.n_expert)[::-1] for blk in tr.moe_layers}     # reversal crosses the 2 groups
    with pytest.raises(LexiError, match="expert groups"):
        rl.relayout(src, tmp_path / "x.gguf", bad, progress=False)
    with pytest.raises(LexiError, match="not a permutation"):
        rl.relayout(src, tmp_path / "x.gguf", {blk: np.zeros(tr.n_expert, int) for blk in tr.moe_layers},
                    progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_a_split_set_is_rewritten_shard_by_shard(tiny_gguf, tmp_path):
    from lexi_gguf.runtime.llama import tool
    src = tiny_gguf("qwen3_moe")
    (tmp_path / "s").mkdir()
    subprocess.run([str(tool("llama-gguf-split")), "--split", "--split-max-tensors", "20", str(src),
                    str(tmp_path / "s" / "m")], check=True, capture_output=True)
    first = tmp_path / "s" / "m-00001-of-00003.gguf"
    assert first.exists()
    orders = _random_orders(src, seed=2)
    out = rl.relayout(first, tmp_path / "perm.gguf", orders, progress=False)
    one = rl.relayout(src, tmp_path / "one.gguf", orders, progress=False)
    assert out.name == "perm-00001-of-00003.gguf" and len(model_info(out).shards) == 3
    a, b = open_reader(one), open_reader(out)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))
    np.testing.assert_array_equal(f32_logits(out), f32_logits(one))
    assert field_value(open_reader(out), keys.EXPERT_ORDER) is not None
