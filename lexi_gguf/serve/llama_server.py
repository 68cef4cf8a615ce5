"""`lexi-gguf serve --engine llama-server`: llama.cpp's own HTTP server, built from the same patched
tree, for many clients: parallel slots and continuous batching (the Python engine queues requests).

Budgets there: a llama.cpp context runs the ladder row chosen at load (`--override-kv
lexi.budget_index=int:N`), and all of llama-server's slots share one context, so one server process
runs one budget. `--budget X` starts exactly that. Without it, every stored budget is a model id, named
as the Python engine names them (NAME, NAME@full, NAME@<budget>): llama-server's router mode, with a
preset file holding one section per id; each id is a child llama-server on the same mmapped file (the
weights' pages are shared through the page cache; each child has its own KV cache and compute buffers).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import LexiError
from ..gguf.reader import model_info
from ..runtime import placement, rpc
from ..runtime.budgets import DEFAULT, budget_kv, resolve
from ..runtime.build import tool
from ..runtime.llama import override_kv_args
from ..runtime.options import LoadOptions
from .server import model_ids


def slot_args(path: Path, n_ctx: int, parallel: int, options: LoadOptions) -> list[str]:
    """Options every instance gets: slots, context (each slot gets n_ctx), threads, devices (the RPC
    servers and split of `options`), repacking (runtime.placement: llama.cpp's --no-repack where
    lexi-gguf's own load would turn it off)."""
    if parallel < 1:
        raise LexiError(f"--parallel {parallel}: give at least 1 slot")
    if options.prefetch != "off":
        raise LexiError("--prefetch is set through the lexi C API, which llama-server does not call: "
                        "use the python engine for prefetch")
    args = ["-np", str(parallel), "-c", str(n_ctx * parallel)]
    if options.threads:
        args += ["-t", str(options.threads)]
    if not placement.decide(path, options.repack, "off"):
        args.append("--no-repack")
    return [*args, *options.tool_args()]


def preset_ini(path: Path, ids: dict, slot_args: list[str]) -> str:
    """llama-server's --models-preset file: a global section with the slot options, one section per id."""
    def kv_lines(args: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(args):
            if i + 1 == len(args) or args[i + 1].startswith("-"):     # a flag: `--no-repack` -> no-repack = true
                out.append(f"{args[i].lstrip('-')} = true")
                i += 1
            else:
                out.append(f"{args[i].lstrip('-')} = {args[i + 1]}")
                i += 2
        return out
    lines = ["version = 1", "", "[*]", *kv_lines(slot_args)]
    for mid, b in ids.items():
        lines += ["", f"[{mid}]", f"model = {path.resolve()}", "load-on-startup = true"]
        lines += kv_lines(override_kv_args(budget_kv(b)))
    return "\n".join(lines) + "\n"


def command(path, *, budget: str | None = None, host: str = "127.0.0.1", port: int = 8080, n_ctx: int = 2048,
            parallel: int = 4, threads: int | None = None, n_gpu_layers: int | None = None, api_key: str | None = None,
            workdir: Path | None = None, options: LoadOptions | None = None) -> tuple[list[str], dict]:
    """The llama-server command line and the ids it serves ({id: Budget}); the router's preset file is
    written to workdir. options: devices, repacking and threads as for runtime.llama.load (threads,
    n_gpu_layers: its fields); its RPC servers are probed here, llama-server registers them itself."""
    path = Path(path)
    opts = (options or LoadOptions()).updated(threads=threads, n_gpu_layers=n_gpu_layers)
    info = model_info(path)      # structure, split set and lexi keys checked (runtime.llama.check_file)
    slots = slot_args(path, n_ctx, parallel, opts)
    for ep in opts.rpc:          # a server that is down: our one-line error, not llama-server's abort
        rpc.probe(ep)
    name = path.stem
    exe = str(tool("llama-server"))
    common = ["--host", host, "--port", str(port), *(["--api-key", api_key] if api_key else [])]
    if budget is not None:
        b = resolve(info, budget, path.name)
        mid = name if b.name == DEFAULT else f"{name}@{b.name}"
        cmd = [exe, "-m", str(path), "--alias", mid, *slots, *override_kv_args(budget_kv(b)), *common]
        return cmd, {mid: b}
    ids = model_ids(name, info, resolve(info, DEFAULT, path.name))
    if workdir is None:
        raise LexiError("serving every budget needs a directory for llama-server's preset file")
    text = preset_ini(path, ids, slots)
    # named by content: servers of other files or options never share (or rewrite) one preset file
    ini = Path(workdir) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.presets.ini"
    if not ini.exists():
        tmp = ini.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(ini)
    cmd = [exe, "--models-preset", str(ini), "--models-max", str(len(ids)), *common]
    return cmd, ids


def serve(path, **kw) -> None:
    """Become llama-server (exec: its signals, its exit status, no Python process left holding memory)."""
    from ..runtime.build import cache_root
    presets = cache_root() / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    cmd, ids = command(path, workdir=presets, **kw)
    host, port = kw.get("host", "127.0.0.1"), kw.get("port", 8080)
    mode = "one budget" if len(ids) == 1 else f"router mode: one llama-server per model id, {len(ids)} in all"
    print(f"serving {Path(path).name} with llama.cpp's llama-server at http://{host}:{port}/v1 "
          f"({kw.get('parallel', 4)} slots each; {mode}); model ids:", flush=True)
    for mid, b in ids.items():
        print(f"  {mid:<28} budget {b.name:<8} k per layer {b.counts}", flush=True)
    print("$ " + " ".join("***" if c == kw.get("api_key") else c for c in cmd), flush=True)
    os.execv(cmd[0], cmd)
