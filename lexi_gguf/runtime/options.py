"""How a model is loaded: one immutable object, built by the caller (the CLI from its device options, a
Python program by hand) and handed to runtime.llama.load and to whatever runs on its behalf (chat,
serve with either engine, bench, eval, trace, llama.cpp's tools run as children).

Nothing here is process state: two loads in one process may use different RPC servers, splits, repack
modes or prefetch modes. The one thing that stays process-wide is ggml's: an RPC server, once
registered (runtime.rpc.connect, done by load for the servers its options name), stays registered
until the process ends; a load whose options do not name it does not put layers on it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import LexiError

# guess / guess2: also the experts the next one / two MoE layers' routers pick from this layer's input,
# asked for before this layer's experts run (a slower disk needs its reads started earlier)
PREFETCH_MODES = {"off": -1, "chosen": 0, "guess": 1, "guess2": 2}
REPACK_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class LoadOptions:
    """n_gpu_layers: layers offloaded to GPUs / RPC servers (-1: all; 0: none). rpc: the RPC servers
    (HOST:PORT) those layers may go to, in llama.cpp's device order (they come before local GPUs).
    tensor_split: each device's share of the offloaded layers, in that order. repack: auto | on | off,
    whether ggml may copy CPU weights into its repacked layouts (runtime.placement). prefetch: expert
    prefetch from the mapped file (runtime.llama.set_prefetch). threads: CPU threads (None: llama.cpp's
    default). expert_cache: a size (4G, 3.5GiB, bytes, auto) of routed-expert memory the runtime's expert
    cache keeps to (runtime.expertcache; None: the page cache decides); cache_policy: its eviction
    policy (None: the recommended one); cache_predictor: what `learned` guesses with (runtime.lookahead). cpu_moe: the routed experts of the first N layers stay on the CPU
    (llama.cpp's --n-cpu-moe); override_tensor: PATTERN=BUFFER specs (llama.cpp's -ot, e.g. exps=CPU):
    runtime.moeplace."""
    n_gpu_layers: int = 0
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    repack: str = "auto"
    prefetch: str = "off"
    threads: int | None = None
    expert_cache: str | None = None
    cache_policy: str | None = None
    cache_predictor: str | None = None
    cpu_moe: int = 0
    override_tensor: tuple[str, ...] = ()

    def __post_init__(self):
        rpc = self.rpc.strip() if isinstance(self.rpc, str) else list(self.rpc or ())
        if rpc:             # "HOST:PORT,..." or a list of them; checked and normalised (a bare HOST: port 50052)
            from .rpc import parse_endpoints
            rpc = parse_endpoints(rpc)
        object.__setattr__(self, "rpc", tuple(rpc))
        if self.tensor_split is not None:
            split = tuple(float(x) for x in self.tensor_split)
            if any(x < 0 for x in split) or (split and not any(split)):
                raise LexiError(f"tensor split {','.join(f'{x:g}' for x in split)}: give non-negative shares, not all 0")
            object.__setattr__(self, "tensor_split", split or None)
        if self.repack not in REPACK_MODES:
            raise LexiError(f"unknown repack mode {self.repack!r}: use {', '.join(REPACK_MODES)}")
        if self.prefetch not in PREFETCH_MODES:
            raise LexiError(f"unknown prefetch mode {self.prefetch!r}: use {', '.join(PREFETCH_MODES)}")
        if not isinstance(self.n_gpu_layers, int):
            raise LexiError(f"n_gpu_layers {self.n_gpu_layers!r}: give an integer (-1: every layer)")
        if not isinstance(self.cpu_moe, int) or self.cpu_moe < 0:
            raise LexiError(f"--n-cpu-moe {self.cpu_moe!r}: give a number of layers >= 0")
        ot = (self.override_tensor,) if isinstance(self.override_tensor, str) else tuple(self.override_tensor or ())
        from .moeplace import parse
        for spec in ot:
            parse(spec)
        object.__setattr__(self, "override_tensor", ot)
        if self.expert_cache is not None or self.cache_policy is not None or self.cache_predictor is not None:
            self._check_cache()

    def _check_cache(self) -> None:
        from .cacheopts import CACHE_POLICIES, parse_size
        if self.cache_policy is not None and self.cache_policy not in CACHE_POLICIES:
            raise LexiError(f"--cache-policy {self.cache_policy!r}: use one of {', '.join(CACHE_POLICIES)}")
        if self.cache_predictor is not None and not (self.cache_policy or "").startswith("learned"):
            raise LexiError("--cache-predictor guesses for --cache-policy learned: add --cache-policy learned")
        if self.expert_cache is None:
            raise LexiError("--cache-policy needs --expert-cache SIZE (the cache it runs)")
        parse_size(self.expert_cache)
        why = ("it offloads layers (--n-gpu-layers / --rpc): the cache manages experts read from this machine's "
               "mapped file" if self.n_gpu_layers != 0 or self.rpc else
               "ggml's repacked copies are not the mapped file: use --repack off or auto" if self.repack == "on" else
               "the cache asks for its own experts: leave out --prefetch" if self.prefetch != "off" else None)
        if why:
            raise LexiError(f"--expert-cache: {why}")

    def updated(self, **fields) -> LoadOptions:
        """These options with the fields given (a None value leaves the field as it is)."""
        given = {k: v for k, v in fields.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def tool_args(self) -> list[str]:
        """The same devices for a llama.cpp tool run as a child (llama-perplexity, llama-server):
        -ngl, -ts, --rpc, -ot, --n-cpu-moe. Threads and repacking are each tool's own options."""
        args = ["-ngl", str(999 if self.n_gpu_layers < 0 else self.n_gpu_layers)]
        if self.tensor_split:
            args += ["-ts", ",".join(f"{x:g}" for x in self.tensor_split)]
        if self.rpc:
            args += ["--rpc", ",".join(self.rpc)]
        from .moeplace import tool_args
        return args + tool_args(self.cpu_moe, self.override_tensor)


def merged(options: LoadOptions | None = None, **fields) -> LoadOptions:
    """options (default LoadOptions()) with the fields a caller gave by keyword (None: not given): the
    functions that load a model take both, so that `bench(path, budgets, threads=2)` keeps working."""
    return (options or LoadOptions()).updated(**fields)
