"""Experts stored in co-activation order (`lexi-gguf relayout`, issue 19 item 4).

A GGUF stores each MoE layer's experts as slices of one tensor per projection, expert 0 first. When
the file is paged (a model larger than RAM, mmapped), a page fault reads around it (the disk's
read-ahead, 128 KiB to 8 MiB), so what lies next to an expert is read with it. This permutes each
layer's experts so that experts the same token uses together lie side by side, the hottest first,
from a routing trace (`lexi-gguf trace`) of the same file.

The router's rows (and its bias), `exp_probs_b` and every per-expert tensor of the layer (gate, up,
down, fused gate_up, their biases) move together: stock llama.cpp loads the file, routing picks the
same experts under new ids, and outputs are unchanged up to the router softmax's summation order.
Group-limited routing (DeepSeek-V3's expert groups are blocks of consecutive ids) keeps every expert
in its group. The permutation is stored (`lexi.expert_order`: the original id at each position), so
a trace or predictor made on the original file can be mapped; a trace of the new file numbers experts
as the new file does.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import LexiError
from ..gguf import keys
from ..gguf.reader import field_value, model_info, open_reader

# tensors whose outermost dimension is the expert: permuted; other names with "exps" are refused
PER_EXPERT = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down|gate_up)_exps|ffn_gate_inp|exp_probs_b|exp_probs_b_vl)"
                        r"\.(weight|bias|scale)$")
NOT_PER_EXPERT = ("ffn_norm_exps",)     # arctic: one norm in front of all experts


def coactivation(trace, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, freq) of MoE layer j: C[a, b] = tokens that selected both a and b, freq[a] = tokens that selected a."""
    sel = trace.experts[:, j, :]
    onehot = np.zeros((len(sel), trace.n_expert), np.float64)
    rows, cols = np.nonzero(sel >= 0)
    onehot[rows, sel[rows, cols]] = 1.0
    C = onehot.T @ onehot
    freq = np.diag(C).copy()
    np.fill_diagonal(C, 0.0)
    return C, freq


def chain_order(C: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """A linear order with co-activated experts adjacent: the greedy-edge heuristic of the travelling
    salesman (join the strongest pairs into paths, no expert with more than two neighbours, no cycles),
    then the paths hottest first, each from its hotter end. Experts never selected come last, by id."""
    n = len(freq)
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    nbrs: list[list[int]] = [[] for _ in range(n)]
    iu, ju = np.triu_indices(n, 1)
    w = C[iu, ju]
    for e in np.argsort(-w, kind="stable"):
        if w[e] <= 0:
            break
        a, b = int(iu[e]), int(ju[e])
        if len(nbrs[a]) < 2 and len(nbrs[b]) < 2 and root(a) != root(b):
            nbrs[a].append(b)
            nbrs[b].append(a)
            parent[root(a)] = root(b)
    paths, seen = [], set()
    for start in sorted(range(n), key=lambda a: -freq[a]):
        if start in seen or len(nbrs[start]) > 1:
            continue
        path, prev, cur = [], -1, start
        while cur != -1:
            path.append(cur)
            seen.add(cur)
            nxt = [x for x in nbrs[cur] if x != prev]
            prev, cur = cur, (nxt[0] if nxt else -1)
        paths.append(path)
    paths.sort(key=lambda p: (-sum(freq[a] for a in p), p[0]))
    order = [a for p in paths for a in p if freq[a] > 0] + [a for a in range(n) if freq[a] == 0]
    assert sorted(order) == list(range(n))
    return np.array(order, np.int64)


def coactivation_orders(trace, n_group: int = 1) -> dict[int, np.ndarray]:
    """Per MoE block (by block index): the original expert id at each new position. With expert groups,
    each group is ordered within itself."""
    E = trace.n_expert
    if n_group < 1 or E % n_group:
        raise LexiError(f"{E} experts do not split into {n_group} expert groups")
    size = E // n_group
    out = {}
    for j, blk in enumerate(trace.moe_layers):
        C, freq = coactivation(trace, j)
        out[int(blk)] = np.concatenate([g * size + chain_order(C[g * size:(g + 1) * size, g * size:(g + 1) * size],
                                                               freq[g * size:(g + 1) * size]) for g in range(n_group)])
    return out


def adjacency(trace, orders: dict[int, np.ndarray] | None = None) -> float:
    """Share of co-activated pairs (same token, same layer) stored next to each other: in id order, or
    in `orders`."""
    near = total = 0.0
    for j, blk in enumerate(trace.moe_layers):
        C, _ = coactivation(trace, j)
        o = np.arange(trace.n_expert) if orders is None else orders[int(blk)]
        near += float(C[o[:-1], o[1:]].sum())
        total += float(C.sum()) / 2
    return near / total if total else 0.0


def stored_order(reader, block_count: int, n_expert: int) -> np.ndarray:
    """[block, position] -> original expert id of a file written by relayout (identity otherwise)."""
    got = field_value(reader, keys.EXPERT_ORDER)
    base = np.tile(np.arange(n_expert, dtype=np.int64), (block_count, 1))
    if got is None:
        return base
    got = np.asarray(got, np.int64)
    if got.size != block_count * n_expert:
        raise LexiError(f"{keys.EXPERT_ORDER} holds {got.size} ids, not {block_count} blocks x {n_expert} experts")
    return got.reshape(block_count, n_expert)


def relayout(src: str | Path, out: str | Path, orders: dict[int, np.ndarray], *, force: bool = False,
             progress: bool = True) -> Path:
    """Write `out`: src with each block's experts in `orders[block]` (original id at each new position;
    blocks not given keep theirs). Streamed tensor by tensor, atomic; split sets stay split."""
    import gguf

    from ..gguf.writer import copy_with_metadata
    r = open_reader(src)
    info = model_info(src, r)
    E, arch = info.expert_count, info.arch
    n_group = int(field_value(r, f"{arch}.expert_group_count") or 1)
    for blk, o in orders.items():
        o = np.asarray(o)
        if blk not in info.moe_layers:
            raise LexiError(f"an expert order for block {blk}, which is not an MoE layer of {Path(src).name} "
                            f"(MoE blocks: {info.moe_layers}); was the trace recorded on another model?")
        if sorted(o.tolist()) != list(range(E)):
            raise LexiError(f"the expert order of block {blk} is not a permutation of {E} experts; was the trace "
                            "recorded on another model?")
        if n_group > 1 and any(set(o[g * (E // n_group):(g + 1) * (E // n_group)] // (E // n_group)) != {g}
                               for g in range(n_group)):
            raise LexiError(f"the expert order of block {blk} moves experts between the model's {n_group} expert "
                            "groups (group-limited routing picks groups by id blocks)")
    for t in r.tensors:
        base = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if ("exps" in base or "exp_probs" in base) and not PER_EXPERT.match(t.name) and base not in NOT_PER_EXPERT:
            raise LexiError(f"{t.name}: a per-expert tensor relayout does not know; re-laying out would break it")

    def data(t):
        m = PER_EXPERT.match(t.name)
        if not m or int(m.group(1)) not in orders:
            return t.data
        d = np.asarray(t.data)
        if d.shape[0] != E:          # e.g. a router input scale [n_embd]: not one entry per expert
            return t.data
        return d[np.asarray(orders[int(m.group(1))])]
    prior = stored_order(r, info.block_count, E)
    for blk, o in orders.items():
        prior[blk] = prior[blk][np.asarray(o)]
    T = gguf.GGUFValueType
    new = {keys.EXPERT_ORDER: ([int(x) for x in prior.ravel()], T.ARRAY, T.UINT32)}
    del r
    return copy_with_metadata(src, out, new, force=force, drop_prefix="\0", progress=progress, tensor_data=data,
                              same_shapes=True)


def relayout_from_trace(src: str | Path, out: str | Path, trace_path: str | Path, *, force: bool = False,
                        progress: bool = True, log=print) -> Path:
    """`lexi-gguf relayout`: the co-activation order of a trace recorded on src, written to out."""
    from ..runtime.trace import Trace
    tr = Trace.load(trace_path)
    r = open_reader(src)
    info = model_info(src, r)
    if tr.n_expert != info.expert_count or sorted(int(b) for b in tr.moe_layers) != list(info.moe_layers):
        raise LexiError(f"{Path(trace_path).name} was recorded on a model with {tr.n_expert} experts in MoE blocks "
                        f"{[int(b) for b in tr.moe_layers]}; {Path(src).name} has {info.expert_count} in "
                        f"{info.moe_layers}: record the trace on this file (`lexi-gguf trace {Path(src).name}`)")
    if tr.meta.get("model") and Path(tr.meta["model"]).name != Path(src).name:
        log(f"note: {Path(trace_path).name} was recorded on {Path(tr.meta['model']).name}; its expert ids must be "
            f"those of {Path(src).name} (same experts in the same order)")
    orders = coactivation_orders(tr, int(field_value(r, f"{info.arch}.expert_group_count") or 1))
    del r
    log(f"co-activated pairs stored side by side: {adjacency(tr):.1%} in id order -> {adjacency(tr, orders):.1%} "
        f"({len(tr.tokens)} tokens, {len(orders)} MoE layers)")
    return relayout(src, out, orders, force=force, progress=progress)
