"""One model, many budgets, one load.

llama-cpp-python's server asks a LlamaProxy for the Llama of each request's `model` id (loading
another model on a change). LexiProxy answers every id with the same loaded Llama and only switches
the context's ladder row (runtime.set_lexi_row: no reload; the KV cache of another budget is dropped,
so no prefix computed at another budget is reused). Ids: `NAME` (the budget the server started with),
`NAME@full` (the model's own k), `NAME@<budget>` for each stored budget.
"""
from __future__ import annotations

import contextlib
import ipaddress
import signal
import sys
from pathlib import Path

from .. import LexiError
from ..runtime.budgets import COUNTS, DEFAULT, FULL, Budget, budgets, resolve, run_budget
from ..gguf.reader import model_info
from ..runtime.binding import create_server_app
from ..runtime.llama import load

SERVER_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def model_ids(name: str, info, default: Budget) -> dict[str, Budget]:
    stored = budgets(info)
    ids = {name: default, f"{name}@{FULL}": stored[FULL]}
    for b in stored.values():
        if b.name not in (FULL, DEFAULT):
            ids[f"{name}@{b.name}"] = b
    return ids


def _server_modules():
    missing = [m for m in SERVER_DEPS if not _importable(m)]
    if missing:
        raise LexiError(f"the server needs {', '.join(missing)}; run `make setup` (or pip install -e .) to install them")
    from llama_cpp.server import app as app_mod
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    return app_mod, ModelSettings, ServerSettings


def _importable(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


class LexiProxy:
    """What llama-cpp-python's app asks for a request's model id (its LlamaProxy interface): every id
    is the one loaded Llama, switched to that id's budget. `NAME@k=8,6,...` runs any counts (one per MoE
    layer) for that request, without a row in the file."""

    def __init__(self, llm, ids: dict[str, Budget], default_id: str, info=None):
        self._llm, self._ids, self._default_id, self._info = llm, ids, default_id, info

    def __call__(self, model: str | None = None):
        from fastapi import HTTPException
        mid = model or self._default_id
        if self._info is not None and mid.startswith(f"{self._default_id}@{COUNTS}"):
            try:
                b = resolve(self._info, mid.split("@", 1)[1], self._default_id)
            except LexiError as e:
                raise HTTPException(status_code=400, detail=f"model {mid!r}: {e}") from None
            run_budget(self._llm, b)
            return self._llm
        if mid not in self._ids:
            raise HTTPException(status_code=404, detail=f"model {mid!r} is not served here; model ids: {', '.join(self._ids)}")
        run_budget(self._llm, self._ids[mid])
        return self._llm

    def __iter__(self):
        yield from self._ids

    def __getitem__(self, model: str) -> dict:
        b = self._ids[model]
        return {"model": model, "budget": b.name, "expert_used_count": b.counts}

    def free(self) -> None:
        self._llm.close()


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": None}})


# what the OpenAI API refuses (its documented ranges) and llama-cpp-python's schema lets through (top_p and
# the penalties it bounds itself: a 422 naming the field): `max_tokens` -3 taken as "no limit", 0 as a
# completion of nothing, `temperature` -5 as greedy, `top_logprobs` 99, `n` 5 answered with one choice.
# field -> (lowest, highest, what is allowed)
RANGES = {
    "temperature": (0.0, 2.0, "between 0 and 2"),
    "max_tokens": (1, None, "at least 1 (or null for no limit)"),
    "top_logprobs": (0, 20, "between 0 and 20"),
    "n": (1, 1, "1: this server returns one choice per request; send n requests for n answers"),
    "best_of": (1, 1, "1: this server returns one choice per request"),
}


def out_of_range(data: dict) -> tuple[str, str] | None:
    """(field, message) for the first field outside the range the OpenAI API allows, else None."""
    for name, (lo, hi, allowed) in RANGES.items():
        v = data.get(name)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue        # absent, null, or of the wrong type (the schema check names those)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return name, f"{name} is {v}; it must be {allowed}"
    return None


def add_request_checks(app) -> None:
    """Malformed requests get a 4xx JSON error in OpenAI's shape. llama-cpp-python's server answers a
    body that is not JSON, or of the wrong shape, with a 500 (its error handler re-reads the body),
    runs a chat with no messages at all, and takes values the OpenAI API refuses (RANGES)."""
    import json

    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError
    schemas = {"/v1/chat/completions": CreateChatCompletionRequest, "/v1/completions": CreateCompletionRequest}

    @app.middleware("http")
    async def check_body(request, call_next):
        schema = schemas.get(request.url.path) if request.method == "POST" else None
        if schema is not None:
            try:
                data = json.loads(await request.body())
            except ValueError as e:
                return _error(400, f"the request body is not valid JSON ({e})")
            if not isinstance(data, dict):
                return _error(400, "the request body must be a JSON object")
            try:
                schema.model_validate(data)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                return _error(422, f"{where}: {first['msg']} ({e.error_count()} problem(s) in the request)", where)
            if schema is CreateChatCompletionRequest and not data.get("messages"):
                return _error(400, "messages must be a non-empty list of {role, content}", "messages")
            bad = out_of_range(data)
            if bad:
                return _error(400, bad[1], bad[0])
        return await call_next(request)


def build_app(path, *, budget: str | None = None, n_ctx: int = 2048, threads: int | None = None,
              n_gpu_layers: int | None = None, api_key: str | None = None, name: str | None = None,
              prefetch: str | None = None, options=None):
    """llama-cpp-python's FastAPI app, serving the one model at every stored budget. options: how the
    model is loaded (runtime.options.LoadOptions); threads, n_gpu_layers, prefetch: its fields."""
    app_mod, ModelSettings, ServerSettings = _server_modules()
    path = Path(path)
    info = model_info(path)
    name = name or path.stem
    default = resolve(info, budget or DEFAULT, path.name)
    ids = model_ids(name, info, default)
    llm = load(path, options=options, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, prefetch=prefetch)
    run_budget(llm, default)
    proxy = LexiProxy(llm, ids, name, info)
    # requests queue (interrupt_requests would cut a streaming answer when the next request arrives)
    server_settings = ServerSettings(api_key=api_key, interrupt_requests=False)
    settings = ModelSettings(model=str(path), model_alias=name, n_ctx=n_ctx)

    app = create_server_app(proxy, server_settings, [settings])
    add_request_checks(app)
    return app, ids


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def serve(path, *, budget: str | None = None, host: str = "127.0.0.1", port: int = 8080, n_ctx: int = 2048,
          threads: int | None = None, n_gpu_layers: int | None = None, api_key: str | None = None,
          prefetch: str | None = None, options=None) -> None:
    import uvicorn
    app, ids = build_app(path, budget=budget, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, api_key=api_key,
                         prefetch=prefetch, options=options)
    if not _is_loopback(host) and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr)
    print(f"serving {Path(path).name} at http://{host}:{port}/v1 (OpenAI-compatible); model ids:", flush=True)
    for mid, b in ids.items():
        print(f"  {mid:<28} budget {b.name:<8} k per layer {b.counts}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal: end with status 0
    def stopped(signum, frame):
        print(f"lexi-gguf serve: stopped ({signal.Signals(signum).name})", flush=True)
        sys.exit(0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)
    uvicorn.run(app, host=host, port=port, log_level="warning")
