"""llama.cpp's RPC backend: other machines lend their backend (`ggml-rpc-server` there), this process
registers them as devices and llama.cpp puts the offloaded layers on them (docs/rpc.md).

What llama.cpp's `--rpc` does (common/arg.cpp add_rpc_devices), from Python: the RPC backend's
`ggml_backend_rpc_add_server`, then `ggml_backend_register`. Registration is process-wide, as in
llama.cpp (ggml's registry has no way back), and happens once per server; which registered servers a
load puts layers on is its own (runtime.options.LoadOptions.rpc): runtime.llama.load registers the
servers its options name and hands llama.cpp exactly their devices (`devices_for`).

ggml's RPC client aborts the process when a server cannot be reached or stops answering mid-run
(GGML_ABORT, with a backtrace). So servers are probed before they are registered (a clear error naming
the endpoint), and while any is registered a ggml abort hook turns the abort into one line naming the
servers and exit status EXIT_RPC_LOST.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys

from .. import LexiError

EXIT_RPC_LOST = 3
DEFAULT_PORT = 50052          # ggml-rpc-server's default
PROBE_TIMEOUT_S = 3.0

_servers: list[str] = []      # endpoints registered with ggml in this process, in order
_abort_cb = None              # keep the ctypes callback alive while ggml holds it


def parse_endpoints(spec: str | list[str]) -> list[str]:
    """`HOST:PORT[,HOST:PORT...]` (a bare HOST takes port 50052) -> endpoints; bad ones are an error."""
    items = spec if isinstance(spec, list) else spec.split(",")
    out = []
    for raw in (s.strip() for s in items):
        if not raw:
            continue
        host, sep, port = raw.rpartition(":")
        if not sep:
            host, port = raw, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LexiError(f"--rpc {raw!r}: expected HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT}), "
                            "several separated by commas")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise LexiError(f"--rpc {spec!r} names no server: give HOST:PORT[,HOST:PORT...]")
    if len(set(out)) != len(out):
        raise LexiError(f"--rpc {spec!r} names a server twice")
    return out


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connection to the server, so an unreachable one is our error and not ggml's abort."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise LexiError(f"no RPC server answers at {endpoint} ({why}): start one there with "
                        f"`lexi-gguf rpc-server --host HOST --port {port}` (llama.cpp's ggml-rpc-server, same "
                        "build), or drop it from --rpc") from None


def supported() -> bool:
    """Whether the runtime was built with ggml's RPC backend (GGML_RPC=ON)."""
    from .binding import import_llama_cpp
    return bool(import_llama_cpp().llama_supports_rpc())


def _install_abort_hook(lib) -> None:
    global _abort_cb
    if _abort_cb is not None:
        return
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(msg):
        text = (msg or b"").decode("utf-8", "replace")
        sys.stderr.write(f"lexi-gguf: error: llama.cpp stopped ({text.strip()}); with RPC servers "
                         f"{', '.join(_servers)} this means one was lost or answered wrongly: check that "
                         "each ggml-rpc-server is still running and is the same build (lexi-gguf doctor)\n")
        sys.stderr.flush()
        os._exit(EXIT_RPC_LOST)

    _abort_cb = proto(on_abort)
    lib.ggml_set_abort_callback.restype = ctypes.c_void_p
    lib.ggml_set_abort_callback.argtypes = [proto]
    lib.ggml_set_abort_callback(_abort_cb)


def connect(spec: str | list[str]) -> list[str]:
    """Probe and register RPC servers with ggml (once per endpoint and process); returns the endpoints
    asked for. Registration alone puts no layer anywhere: a load names the servers it uses."""
    endpoints = parse_endpoints(spec)
    if not supported():
        raise LexiError("this runtime was built without ggml's RPC backend; rebuild it with `make setup`")
    from .binding import libggml
    lib = libggml()
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    addr = reg and lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not addr:
        raise LexiError("the runtime's ggml has no RPC backend registered; rebuild it with `make setup`")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
    for ep in endpoints:
        if ep in _servers:
            continue
        probe(ep)
        _install_abort_hook(lib)
        _servers.append(ep)               # before the call: the abort hook names it
        server_reg = add_server(ep.encode())
        if not server_reg:
            _servers.remove(ep)
            raise LexiError(f"the RPC server at {ep} offers no device")
        lib.ggml_backend_register(server_reg)
    return endpoints


def servers() -> list[str]:
    """Every endpoint registered in this process (not: the ones a load uses)."""
    return list(_servers)


# ggml_backend_dev_type
_DEV_GPU, _DEV_IGPU = 1, 2


def _device_api(lib):
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in (("ggml_backend_dev_count", ctypes.c_size_t, []), ("ggml_backend_dev_get", vp, [ctypes.c_size_t]),
                            ("ggml_backend_dev_type", ctypes.c_int, [vp]), ("ggml_backend_dev_backend_reg", vp, [vp]),
                            ("ggml_backend_reg_name", cp, [vp]), ("ggml_backend_dev_description", cp, [vp])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def devices_for(endpoints: tuple[str, ...] | list[str]):
    """The device list (llama_model_params.devices: a NULL-terminated array) that offloads to exactly
    these RPC servers, in this order, then the local GPUs (integrated ones only without a discrete one),
    as llama.cpp's own default selection orders them; None where that default is already this list
    (the servers registered in this process are exactly these, in this order)."""
    if list(endpoints) == _servers:
        return None
    from .binding import libggml
    lib = _device_api(libggml())
    rpc_devs: dict[str, list[int]] = {}
    gpus, igpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_DEV_GPU, _DEV_IGPU):
            continue
        if lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) == b"RPC":
            rpc_devs.setdefault(lib.ggml_backend_dev_description(dev).decode(), []).append(dev)
        else:
            (gpus if kind == _DEV_GPU else igpus).append(dev)
    missing = [ep for ep in endpoints if ep not in rpc_devs]
    if missing:
        raise LexiError(f"RPC server {missing[0]} is not registered in this process (runtime.rpc.connect)")
    chosen = [d for ep in endpoints for d in rpc_devs[ep]] + (gpus or igpus)
    return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)


def server_command(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                   cache: bool = False) -> list[str]:
    """llama.cpp's ggml-rpc-server from the patched tree: this machine's backend for a client's --rpc."""
    from .build import tool
    cmd = [str(tool("ggml-rpc-server")), "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if cache:
        cmd.append("-c")
    return cmd


def start_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                 timeout: float = 30.0, **popen):
    """Start a ggml-rpc-server and return its Popen once it accepts connections."""
    import subprocess
    import time
    proc = subprocess.Popen(server_command(host, port, threads), **popen)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LexiError(f"ggml-rpc-server on {host}:{port} exited with status {proc.returncode} "
                            "(is the port in use?)")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise LexiError(f"ggml-rpc-server on {host}:{port} did not accept connections in {timeout:.0f} s") from None
            time.sleep(0.1)
