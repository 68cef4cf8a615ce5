"""`lexi-gguf trace`: which experts the patched runtime selected, token by token and layer by layer.

Read from the graph as it runs (llama.cpp's eval callback on `ffn_moe_topk-<il>`, the final
`ffn_moe_weights*-<il>` and the router's input), so per-layer k and the runtime's own routing are
what is recorded, not a torch re-computation. Prompts are evaluated as one batch each, then decoding
(greedy, or sampled with a fixed seed) adds generated tokens one at a time (marked). Format: docs/caching.md.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from .. import LexiError
from .graph import ggml_lib, read_tensor, tensor_src
from .tracefile import Trace  # noqa: F401  (the trace format; imported from here by most callers)

# the weights build_moe_ffn finally applies: the last of these it computed for the layer
WEIGHT_NAMES = ("ffn_moe_weights_replayed", "ffn_moe_weights_scaled", "ffn_moe_weights_norm", "ffn_moe_weights_softmax", "ffn_moe_weights")
_NAME = re.compile(r"^(ffn_moe_topk|ffn_moe_logits|" + "|".join(WEIGHT_NAMES) + r")-(\d+)$")


class TraceRecorder:
    """The eval callback: asks for the routing tensors of every MoE layer and keeps their data."""

    def __init__(self, moe_layers: list[int], hidden: bool = False):
        import llama_cpp
        self.lib = ggml_lib()
        self.moe = set(moe_layers)
        self.hidden = hidden
        self.topk: dict[int, list[np.ndarray]] = {il: [] for il in moe_layers}
        self.weights: dict[int, list[np.ndarray]] = {il: [] for il in moe_layers}
        self.states: dict[int, list[np.ndarray]] = {il: [] for il in moe_layers}
        self._pending: dict[int, dict[str, np.ndarray]] = {}
        self.seconds = 0.0
        self.error: Exception | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, user_data) -> bool:
        # an exception cannot cross the C callback: keep it and raise after the decode
        try:
            return self._on_tensor(t, ask)
        except Exception as e:      # noqa: BLE001
            self.error = self.error or e
            return True

    def _on_tensor(self, t, ask: bool) -> bool:
        name = self.lib.ggml_get_name(t).decode("utf-8", "replace")
        m = _NAME.match(name)
        if not m or int(m.group(2)) not in self.moe:
            return False if ask else True
        if ask:
            return m.group(1) != "ffn_moe_logits" or self.hidden
        t0 = time.perf_counter()
        kind, il = m.group(1), int(m.group(2))
        if kind == "ffn_moe_topk":           # [k, n_tokens]: one row of k expert ids per token
            self._flush(il)
            self.topk[il].append(read_tensor(self.lib, t))
        elif kind == "ffn_moe_logits":       # mul_mat(router, cur): cur [n_embd, n_tokens] is its input
            self.states[il].append(read_tensor(self.lib, tensor_src(t, 1)).astype(np.float16))
        else:                                # [1, k, n_tokens] or [k, n_tokens]: k weights per token
            k = self.topk[il][-1].shape[1]
            self._pending.setdefault(il, {})[kind] = read_tensor(self.lib, t).reshape(-1, k)
        self.seconds += time.perf_counter() - t0
        return True

    def _flush(self, il: int) -> None:
        """The weights computed after the last topk of this layer: keep the one applied last."""
        got = self._pending.pop(il, None)
        if got:
            self.weights[il].append(next(got[n] for n in WEIGHT_NAMES if n in got))

    def arrays(self, moe_layers: list[int], counts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        for il in moe_layers:
            self._flush(il)
        kmax = max(counts)
        n_tok = {il: sum(len(a) for a in self.topk[il]) for il in moe_layers}
        if len(set(n_tok.values())) != 1:
            raise LexiError(f"trace is inconsistent: tokens per layer {n_tok}")
        T = next(iter(n_tok.values()))
        experts = np.full((T, len(moe_layers), kmax), -1, dtype=np.int16)
        weights = np.zeros((T, len(moe_layers), kmax), dtype=np.float32)
        for j, il in enumerate(moe_layers):
            e = np.concatenate(self.topk[il]) if self.topk[il] else np.zeros((0, kmax), np.int32)
            w = np.concatenate(self.weights[il]) if self.weights[il] else np.zeros((0, kmax), np.float32)
            experts[:, j, :e.shape[1]] = e
            weights[:, j, :w.shape[1]] = w
        hidden = None
        if self.hidden:
            hidden = np.stack([np.concatenate(self.states[il]) for il in moe_layers], axis=1)
        return experts, weights, hidden


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (float64 copy), whether or not the model keeps all logits."""
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def _next_token(llm, temperature: float, rng) -> int:
    """Greedy (temperature 0) or sampled from softmax(logits / temperature) with a seeded generator."""
    logits = last_logits(llm)
    if temperature <= 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def record(path, *, prompts: list[str] | None = None, texts: list[str] | None = None, tokens: list[list[int]] | None = None,
           budget: str | None = None, no_lexi: bool = False, uniform_k: int | None = None,
           max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, hidden: bool = False,
           n_ctx: int = 1024, threads: int | None = None, n_gpu_layers: int | None = None, progress: bool = True,
           options=None, replay=None) -> Trace:
    """Run the model on prompts (prompt, then generation: greedy, or sampled at `temperature` with a
    fixed seed) or on texts / token lists (no generation), at a budget or a uniform k in every layer
    (as --override-kv does), recording every MoE layer's experts for every evaluated token.
    replay: a trace (or its file) whose routing runs instead of the router's (runtime.replay): what is
    recorded is then the replayed experts at this run's counts.
    options: how the model is loaded (runtime.options.LoadOptions; threads, n_gpu_layers: its fields)."""
    from ..runtime.budgets import DEFAULT, FULL, Budget, resolve, run_budget
    from ..gguf.reader import model_info
    from ..runtime.llama import ROW_LOADED, lexi_overrides, load
    if sum(x is not None and x is not False for x in (budget, no_lexi, uniform_k)) > 1:
        raise LexiError("--budget, --no-lexi and --uniform-k exclude each other")
    if sum(x is not None for x in (prompts, texts, tokens)) != 1:
        raise LexiError("give exactly one of prompts, texts or token lists")
    info = model_info(path)
    if not info.is_moe:
        raise LexiError(f"{path} has no MoE layers: nothing to trace")
    kv = None
    if uniform_k is not None:
        if not 1 <= uniform_k <= info.expert_count:
            raise LexiError(f"--uniform-k {uniform_k} is out of range 1..{info.expert_count}")
        kv = lexi_overrides(info.arch, uniform_k=uniform_k)
        chosen = Budget(f"uniform-k{uniform_k}", ROW_LOADED,
                        [uniform_k if i in info.moe_layers else 0 for i in range(info.block_count)])
    else:
        chosen = resolve(info, FULL if no_lexi else budget or DEFAULT, Path(path).name)
    moe_layers = list(info.moe_layers)
    rec = TraceRecorder(moe_layers, hidden=hidden)
    # logits_all: llama.cpp runs the last layer only for tokens that output logits; all of them must
    llm = load(path, options=options, kv_overrides=kv, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
               eval_callback=rec.callback, logits_all=True)
    run_budget(llm, chosen)
    rp = None
    if replay is not None:
        from .replay import for_model
        rp = for_model(llm, path, replay, chosen.counts)
    eos = llm.token_eos()
    seqs: list[tuple[list[int], bool]] = []
    if tokens is not None:
        seqs = [(list(t), False) for t in tokens]
    elif texts is not None:
        for text in texts:     # chunks of at most n_ctx tokens, no generation
            ids = llm.tokenize(text.encode(), add_bos=True)
            seqs += [(ids[i:i + n_ctx], False) for i in range(0, len(ids), n_ctx)]
    else:
        seqs = [(llm.tokenize(p.encode(), add_bos=True)[: n_ctx - max_new_tokens], True) for p in prompts]
    all_tok, gen_flag, seq_id = [], [], []
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for s, (ids, generate) in enumerate(seqs):
        llm.reset()
        llm.eval(ids)
        all_tok += ids
        gen_flag += [False] * len(ids)
        seq_id += [s] * len(ids)
        if generate:
            for _ in range(max_new_tokens):
                tok = _next_token(llm, temperature, rng)
                if tok == eos:
                    break
                llm.eval([tok])
                all_tok.append(tok)
                gen_flag.append(True)
                seq_id.append(s)
        if progress and (s + 1) % 10 == 0:
            print(f"  traced {s + 1}/{len(seqs)} sequences, {len(all_tok)} tokens", flush=True)
    seconds = time.perf_counter() - t0
    if rp is not None:
        rp.remove()
    llm.close()
    if rp is not None:
        rp.check()
    if rec.error is not None:
        raise LexiError(f"tracing failed inside the eval callback: {rec.error!r}")
    counts = [chosen.counts[il] for il in moe_layers]
    experts, weights, states = rec.arrays(moe_layers, counts)
    if len(experts) != len(all_tok):
        raise LexiError(f"trace recorded {len(experts)} tokens but {len(all_tok)} were evaluated")
    from ..gguf.reader import footprint
    expert_bytes = footprint(path)["expert_bytes"]
    meta = {"model": str(path), "arch": info.arch, "expert_bytes": [expert_bytes[il] for il in moe_layers], "n_expert": info.expert_count, "k_base": info.expert_used_count,
            "budget": chosen.name, "block_count": info.block_count, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed,
            "seconds": seconds, "callback_seconds": rec.seconds,
            **({"replay": {"trace": str(replay) if not hasattr(replay, "meta") else replay.meta.get("model", "?"),
                           **rp.summary()}} if rp is not None else {})}
    return Trace(np.array(all_tok, np.int32), np.array(gen_flag, bool), np.array(seq_id, np.int32),
                 np.array(moe_layers, np.int32), np.array(counts, np.int32), experts, weights, states, meta)
