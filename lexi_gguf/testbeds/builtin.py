"""The built-in default model: a small Mixtral-architecture MoE trained here, on text that ships with
every Python (pydoc topics and standard-library docstrings), with a SentencePiece tokenizer trained on
the same text. It is a testbed with real layer structure, not a product claim: random weights have
no layer structure, so quality numbers on them mean nothing.

Reproducible: the corpus is collected in a fresh interpreter (what the caller had imported used to
change it), the tokenizer's file no longer records a temporary path (the only difference between two
trainings of it on the same text, measured), and training runs in a child whose arithmetic is pinned:
deterministic torch algorithms, a fixed thread count and, on every x86 CPU with AVX2, one code path
(torch's avx2 kernels, MKL's conditional numerical reproducibility and oneDNN capped at AVX2), so that
AVX2, AVX512 and AMX machines compute the same weights. Measured on an AVX2 EPYC: two trainings are
bit-equal, and torch's kernels at another level (ATEN_CPU_CAPABILITY=default) move weights by ~1e-6,
which is what the pin removes; the AVX512 and AMX classes were not at hand to compare. What still
varies: the Python version (its docstrings are the corpus) and the torch and transformers versions.
Trained models are cached by a hash of their recipe in $LEXI_GGUF_CACHE/default-model/<arch>-<hash>.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import LexiError

RECIPE = {
    "arch": "mixtral", "vocab": 4096, "hidden": 192, "layers": 6, "heads": 6, "kv_heads": 2,
    "experts": 16, "k": 4, "expert_ffn": 192, "seq": 128, "batch": 16, "steps": 160, "lr": 3e-3,
    "aux_loss": 0.02, "seed": 1234, "eval_fraction": 0.05, "version": 2,   # 2: reproducible corpus and tokenizer
}
# a second built-in model for the expert-caching work: OLMoE-like ratios (64 experts, k 8, 8 layers),
# so that "10 % of the experts" is more than one token's worth of activations
CACHING_RECIPE = dict(RECIPE, layers=8, experts=64, k=8, expert_ffn=96, steps=240, aux_loss=0.1)
# quality testbeds of other router families (issue 13): Qwen3-MoE normalises its top-k weights, OLMoE does
# not. Their converters only take a byte-level BPE they recognise, so they read GPT-2's vocabulary
# (50,257 ids: ~2 s a step here instead of 0.5 s); 8 layers, 16 experts, k 4 as in the check
QWEN3_TESTBED = dict(RECIPE, arch="qwen3_moe", tokenizer="gpt2", vocab=50257, layers=8, steps=240)
OLMOE_TESTBED = dict(RECIPE, arch="olmoe", tokenizer="gpt2", vocab=50257, layers=8, kv_heads=6, steps=240)
RECIPES = {"default": RECIPE, "caching": CACHING_RECIPE, "qwen3-testbed": QWEN3_TESTBED,
           "olmoe-testbed": OLMOE_TESTBED}

DOC_MODULES = ["os", "sys", "re", "json", "pathlib", "collections", "itertools", "functools", "typing",
               "subprocess", "threading", "asyncio", "socket", "http.client", "urllib.request", "email",
               "logging", "argparse", "datetime", "decimal", "fractions", "statistics", "random", "math",
               "string", "textwrap", "unittest", "inspect", "dataclasses", "enum", "shutil", "tempfile",
               "csv", "sqlite3", "zipfile", "tarfile", "hashlib", "heapq", "bisect", "contextlib", "abc",
               "io", "pickle", "copy", "pprint", "difflib", "tokenize", "ast", "dis", "operator"]


def _recipe(name: str, seed: int | None = None) -> dict:
    """A recipe by name; seed: the same recipe with another training seed (bench_seeds)."""
    if name not in RECIPES:
        raise LexiError(f"no built-in model {name!r}: have {', '.join(RECIPES)}")
    return RECIPES[name] if seed is None else dict(RECIPES[name], seed=seed)


def recipe_hash(name: str = "default", seed: int | None = None) -> str:
    return hashlib.sha256(json.dumps(_recipe(name, seed), sort_keys=True).encode()).hexdigest()[:12]


def cache_dir(name: str = "default", seed: int | None = None) -> Path:
    from ..runtime.build import cache_root
    return cache_root() / "default-model" / f"{_recipe(name, seed)['arch']}-{recipe_hash(name, seed)}"


def stdlib_docs(modules: list[str]) -> list[str]:
    """pydoc's topics, then each module's docstring and its public attributes' long docstrings, in a
    fixed order. corpus() runs this in a fresh interpreter: dir() of a module lists the submodules the
    process happened to import, so in-process the text depended on what had been imported before."""
    import importlib
    import inspect

    import pydoc_data.topics as topics
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            d = inspect.getdoc(getattr(mod, attr, None))
            if d and len(d) > 200:
                docs.append(d)
    return [d.strip() for d in docs if d and d.strip()]


def corpus() -> tuple[str, str]:
    """(train text, held-out eval text), both from the standard library, in a fixed order. The same on
    every machine with the same Python: collected by `python -I -S` (no site-packages, no environment)."""
    src = inspect.getsource(stdlib_docs) + f"\nimport json, sys\njson.dump(stdlib_docs({DOC_MODULES!r}), sys.stdout)\n"
    r = subprocess.run([sys.executable, "-I", "-S", "-c", src], capture_output=True, text=True)
    if r.returncode != 0:
        raise LexiError(f"collecting the standard-library corpus failed:\n{r.stderr[-2000:]}")
    docs = json.loads(r.stdout)
    n_eval = max(1, int(len(docs) * RECIPE["eval_fraction"]))
    # every 20th document is held out, so eval text is in-domain but never trained on
    held = set(range(0, len(docs), 20)[:n_eval])
    eval_docs = [docs[i] for i in sorted(held)]
    train_docs = [d for i, d in enumerate(docs) if i not in held]
    return "\n\n".join(train_docs), "\n\n".join(eval_docs)


def _train_tokenizer(text: str, out_dir: Path, vocab: int) -> None:
    import sentencepiece as spm
    # the model file stores the trainer's input and output paths: relative names inside a temporary
    # folder keep them the same on every run (the vocabulary itself is deterministic)
    with tempfile.TemporaryDirectory() as td, contextlib.chdir(td):
        Path("corpus.txt").write_text(text)
        spm.SentencePieceTrainer.train(
            input="corpus.txt", model_prefix="tokenizer", vocab_size=vocab,
            model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
            bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=2, minloglevel=2,
            max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False)
        for f in ("tokenizer.model", "tokenizer.vocab"):
            shutil.move(f, out_dir / f)
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048,
           "chat_template": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: "
                             "{{ m['content'] }}\n{% else %}Answer: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
                             "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def _tokenize(r: dict, train_text: str, out_dir: Path) -> tuple[list[int], int, int, int]:
    """Save the recipe's tokenizer into out_dir; (train ids, vocab size, bos id, eos id)."""
    if r.get("tokenizer", "spm") == "gpt2":
        from transformers import AutoTokenizer
        from ..runtime.llama import llama_cpp_dir
        from .tinymodels import GPT2_VOCAB, save_gpt2_tokenizer
        if r["vocab"] != GPT2_VOCAB:
            raise LexiError(f"a gpt2-tokenizer recipe has vocab {GPT2_VOCAB}, not {r['vocab']}")
        save_gpt2_tokenizer(out_dir, llama_cpp_dir())
        tok = AutoTokenizer.from_pretrained(out_dir)
        return tok(train_text)["input_ids"], r["vocab"], tok.bos_token_id, tok.eos_token_id
    import sentencepiece as spm
    _train_tokenizer(train_text, out_dir, r["vocab"])
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    return sp.encode(train_text), r["vocab"], 1, 2


def _hf_config(r: dict, vocab: int, bos: int, eos: int):
    from transformers import AutoConfig
    moe = {"mixtral": dict(intermediate_size=r["expert_ffn"], num_local_experts=r["experts"], sliding_window=None),
           "qwen3_moe": dict(intermediate_size=r["expert_ffn"], moe_intermediate_size=r["expert_ffn"],
                             num_experts=r["experts"], norm_topk_prob=True, head_dim=r["hidden"] // r["heads"],
                             decoder_sparse_step=1, mlp_only_layers=[]),
           "olmoe": dict(intermediate_size=r["expert_ffn"], num_experts=r["experts"], norm_topk_prob=False)}
    if r["arch"] not in moe:
        raise LexiError(f"built-in models can be {', '.join(moe)}, not {r['arch']!r}")
    return AutoConfig.for_model(
        r["arch"], vocab_size=vocab, hidden_size=r["hidden"], num_hidden_layers=r["layers"],
        num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"], num_experts_per_tok=r["k"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, output_router_logits=True, router_aux_loss_coef=r["aux_loss"],
        **moe[r["arch"]])


# training threads: reductions split by thread count, so the count is part of the arithmetic
TRAIN_THREADS = 2


def training_env() -> dict:
    """The environment of a training child: the CPU code paths pinned (see the module's docstring)."""
    from ..runtime.cpu import cpu_flags
    from ..runtime.procs import package_env
    pinned = {"OMP_NUM_THREADS": str(TRAIN_THREADS), "MKL_NUM_THREADS": str(TRAIN_THREADS)}
    if "avx2" in cpu_flags():
        pinned.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    return package_env(pinned)


def train(out_dir: Path, steps: int | None = None, log=print, name: str = "default", seed: int | None = None) -> Path:
    """Train a recipe in this process (ensure_default_model runs it in a pinned child)."""
    import torch
    from transformers import AutoModelForCausalLM

    recipe = _recipe(name, seed)
    r = dict(recipe, steps=steps or recipe["steps"])
    out_dir.mkdir(parents=True, exist_ok=True)
    train_text, eval_text = corpus()
    (out_dir / "eval.txt").write_text(eval_text)
    ids, vocab, bos, eos = _tokenize(r, train_text, out_dir)
    ids = torch.tensor(ids, dtype=torch.long)
    log(f"corpus: {len(train_text) / 1e6:.2f} MB, {len(ids) / 1e6:.2f} M tokens; eval {len(eval_text) / 1e3:.0f} kB")
    torch.set_num_threads(TRAIN_THREADS)
    # measured: without it two trainings on one machine differ by ~1e-6 after two steps (a parallel
    # reduction in the MoE backward); with it they are bit-equal
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(r["seed"])
    cfg = _hf_config(r, vocab, bos, eos)
    # grouped_mm: ~1.4x faster than the eager per-expert loop on CPU (measured, transformers 5.23)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(r["seed"])
    seq, bs = r["seq"], r["batch"]
    t0 = time.perf_counter()
    for step in range(r["steps"]):
        lr = r["lr"] * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - seq - 1, (bs,), generator=g)
        batch = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        outp = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == r["steps"] - 1:
            log(f"step {step:4d}/{r['steps']}  loss {outp.loss.item():.3f}  lr {lr:.2e}  {time.perf_counter() - t0:.0f} s")
    model.config.output_router_logits = False
    model.eval().save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(dict(r, hash=recipe_hash(name, seed), seconds=round(time.perf_counter() - t0, 1)), indent=2))
    return out_dir


def ensure_default_model(log=print, name: str = "default", seed: int | None = None) -> Path:
    """The cached trained model folder of a built-in recipe; trains it (atomically, in a child with
    pinned arithmetic: training_env) when missing."""
    from ..runtime.procs import stream_module
    d = cache_dir(name, seed)
    r = _recipe(name, seed)
    if (d / "recipe.json").exists():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=d.parent))
    try:
        log(f"training the {name} model ({r['arch']}, {r['layers']} layers, {r['experts']} experts, "
            f"k {r['k']}, seed {r['seed']}) -> {d}")
        stream_module(__name__, [name, tmp, "--seed", r["seed"]], f"training the {name} model", log=log,
                      env=training_env())
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def main(argv: list[str] | None = None) -> None:
    """The training child: python -m lexi_gguf.testbeds.builtin NAME OUT_DIR [--steps N] [--seed S]."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m lexi_gguf.testbeds.builtin")
    ap.add_argument("name", choices=list(RECIPES))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int)
    a = ap.parse_args(argv)
    train(a.out_dir, steps=a.steps, name=a.name, seed=a.seed)


if __name__ == "__main__":
    main()
