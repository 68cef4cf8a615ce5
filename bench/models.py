"""The bench models more than one bench builds (cached; nothing is downloaded):

* olmoe_shaped: a synthetic OLMoE-shaped Q8_0 model from a transformers config with random weights
  (bench_runtime, bench_cpu_paths);
* big_olmoe: an OLMoE-shaped Q8_0 file of any size written tensor by tensor, with the LExI ladder of a
  tiny template of the same structure (bench_memlimit, bench_repack);
* default_gguf: the built-in default model as Q8_0 with a ladder (bench_serve_load, bench_rpc).
"""
from __future__ import annotations

import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "lexi-gguf" / "bench-models"
TEMPLATE_HIDDEN, TEMPLATE_FFN = 96, 32        # distinct from 64 experts and the vocabulary: dims map 1:1
BUDGETS = [1.0, 0.75, 0.5]


def olmoe_shaped(work: Path, layers: int) -> Path:
    """The synthetic OLMoE-shaped Q8_0 model (hidden 2048, 64 experts, expert ffn 1024, base k 8, random
    bf16 weights, llama.cpp's converter) of bench_runtime and bench_cpu_paths; cached in work."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lexi_gguf.runtime.llama import llama_cpp_dir
    from lexi_gguf.export.hf_to_gguf import convert_to_gguf
    from lexi_gguf.testbeds.tinymodels import save_gpt2_tokenizer
    gguf = work / f"olmoe-shaped-{layers}L-Q8_0.gguf"
    if gguf.exists():
        return gguf
    hf = work / "hf"
    cfg = AutoConfig.for_model("olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                               num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                               vocab_size=50257, max_position_embeddings=4096, bos_token_id=50256, eos_token_id=50256,
                               pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(hf)
    save_gpt2_tokenizer(hf, llama_cpp_dir())
    del model
    convert_to_gguf(hf, gguf, llama_cpp_dir(), outtype="q8_0")
    import shutil
    shutil.rmtree(hf)
    return gguf


def _template(work: Path, layers: int, experts: int, k: int, seed: int) -> Path:
    """The tiny OLMoE of the same structure, converted and given its LExI ladder (cached)."""
    from lexi_gguf.export.apply import apply
    from lexi_gguf.runtime.llama import llama_cpp_dir
    from lexi_gguf.export.hf_to_gguf import convert_to_gguf
    from lexi_gguf.testbeds.tinymodels import make_checkpoint
    out = work / f"olmoe-template-{layers}L-{experts}e-k{k}-s{seed}-lexi.gguf"
    if out.exists():
        return out
    hf = make_checkpoint("olmoe", work / f"hf-template-{layers}L", llama_cpp_dir(), seed=seed,
                         hidden_size=TEMPLATE_HIDDEN, intermediate_size=TEMPLATE_FFN, num_experts=experts,
                         num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         router_scale=4.0)
    f32 = convert_to_gguf(hf, work / f"olmoe-template-{layers}L.gguf", llama_cpp_dir())
    apply(f32, out, budget=0.75, budgets=BUDGETS, samples=2048, seed=seed, threads=2, force=True, progress=False)
    import shutil
    shutil.rmtree(hf, ignore_errors=True)
    f32.unlink(missing_ok=True)
    return out


def big_olmoe(out_dir: Path, *, hidden: int = 2048, ffn: int = 1024, layers: int = 16, experts: int = 64, k: int = 8,
                head_dim: int = 128, seed: int = 0, progress: bool = True) -> Path:
    """The big OLMoE-shaped Q8_0 GGUF with a LExI ladder, written tensor by tensor (cached by shape)."""
    import gguf
    import numpy as np

    from lexi_gguf.gguf.reader import open_one
    from lexi_gguf.gguf.writer import atomic_output
    from lexi_gguf.measure.memlimit import evict
    if hidden % 32 or ffn % 32 or hidden % head_dim:
        raise SystemExit("hidden and ffn must be multiples of 32 (Q8_0 blocks), hidden a multiple of head_dim")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"olmoe-shaped-{layers}L-{experts}x{ffn}-h{hidden}-k{k}-Q8_0-lexi.gguf"
    if out.exists():
        return out
    t0 = time.perf_counter()
    tpl = _template(out_dir, layers, experts, k, seed)
    r = open_one(tpl)
    arch = r.fields["general.architecture"].contents()
    T = gguf.GGUFValueType
    heads = hidden // head_dim
    override = {f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": ffn,
                f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": heads,
                "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
                "general.name": f"olmoe-shaped {layers}L {experts}x{ffn} h{hidden}",
                "general.size_label": None}
    rng = np.random.default_rng(seed)
    d = np.array([2.7e-4], dtype=np.float16).view(np.uint8)    # int8 in [-128,127] x d: std ~0.02

    def dims(t):
        return [hidden if n == TEMPLATE_HIDDEN else ffn if n == TEMPLATE_FFN else int(n) for n in t.shape]

    def qtype(t, ne):
        return (gguf.GGMLQuantizationType.F32 if len(ne) < 2 or "ffn_gate_inp" in t.name or ne[0] % 32
                else gguf.GGMLQuantizationType.Q8_0)

    with atomic_output(out, force=True) as tmp:
        w = gguf.GGUFWriter(tmp, arch=arch)
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            if f.name in override:
                if override[f.name] is None:
                    continue
                w.add_key_value(f.name, override[f.name], f.types[0])
                continue
            vt = f.types[0]
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == T.ARRAY else None)
        plan = []
        total = 0
        for t in r.tensors:
            ne = dims(t)
            qt = qtype(t, ne)
            np_shape = list(reversed(ne))
            if qt == gguf.GGMLQuantizationType.Q8_0:
                byte_shape = np_shape[:-1] + [np_shape[-1] // 32 * 34]
                nbytes = int(np.prod(byte_shape))
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
            else:
                nbytes = int(np.prod(np_shape)) * 4
                w.add_tensor_info(t.name, np_shape, np.dtype(np.float32), nbytes)
            plan.append((t.name, np_shape, qt, nbytes))
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for name, np_shape, qt, nbytes in plan:
            if qt == gguf.GGMLQuantizationType.Q8_0:
                a = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy().reshape(-1, 34)
                a[:, :2] = d
                a = a.reshape(np_shape[:-1] + [np_shape[-1] // 32 * 34])
            elif "ffn_gate_inp" in name:   # router: O(1) logits after the RMS norm, so routing varies by token
                a = rng.standard_normal(np_shape, dtype=np.float32) * np.float32(2.0 / np.sqrt(hidden))
            else:                            # norms
                a = np.ones(np_shape, dtype=np.float32)
            w.write_tensor_data(a)
            done += nbytes
            del a
            if progress and done * 10 // total != (done - nbytes) * 10 // total:
                print(f"  wrote {done / 2**30:.2f} / {total / 2**30:.2f} GiB", flush=True)
        w.close()
    evict(out)    # a bench starts from an evicted file anyway; leave the page cache to others meanwhile
    print(f"model {out} ({out.stat().st_size / 2**30:.2f} GiB) built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def default_gguf(work: Path, threads: int) -> Path:
    """The built-in default model converted to Q8_0 with the ladder 1 / 0.75 / 0.5 (cached in work)."""
    from lexi_gguf.export.convert import convert
    from lexi_gguf.testbeds.builtin import ensure_default_model, recipe_hash
    out = work / f"default-{recipe_hash('default')}-Q8_0.gguf"
    if not out.exists():
        convert(ensure_default_model(), out, budget=0.75, budgets=[1.0, 0.75, 0.5], quant="Q8_0", threads=threads)
    return out

