"""The per-backend table of which k each MoE kernel runs (lexi_gguf.method.backends.KERNELS) against the
pinned llama.cpp it cites: every file and symbol read out of the pinned sdist (no network once set up,
~2 s), so a version bump that changes a kernel's k fails here; --backend-safe for each backend."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.method import backends as B

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pinned_sources() -> dict[str, str]:
    """The text of every file KERNELS cites, from the pinned sdist's vendor/llama.cpp (the files the
    patches do not touch: tests/test_patches.py checks what they touch)."""
    from lexi_gguf.runtime.build import cache_root, fetch_sdist, read_pin
    pin = read_pin()
    sdist = fetch_sdist(pin, cache_root() / "sdist")     # cached by the set-up; checked against its sha256
    wanted = {r.file for r in B.KERNELS} | {f.file for r in B.KERNELS for f in r.facts}
    prefix = f"llama_cpp_python-{pin.version}/vendor/llama.cpp/"
    out = {}
    with tarfile.open(sdist) as tf:
        for m in tf:
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel in wanted:
                out[rel] = tf.extractfile(m).read().decode()
    assert set(out) == wanted, f"the pinned sdist lacks {sorted(wanted - set(out))}"
    return out


def test_every_row_holds_in_the_pinned_sources(pinned_sources):
    assert {r.backend for r in B.KERNELS} == set(B.BACKENDS)
    for row in B.KERNELS:
        assert row.symbol in pinned_sources[row.file], f"{row.backend}: {row.symbol} not in {row.file}"
        for fact in row.facts:
            got = B.read_fact(pinned_sources[fact.file], fact)
            assert got == fact.expect, f"{row.backend} {row.kernel}: {fact.file} /{fact.pattern}/ gives {got}, " \
                                       f"the table says {fact.expect}"


def test_the_k_sets_come_from_the_sources(pinned_sources):
    """METAL_K and CUDA_FAST_K, which allocation uses, are what the kernels instantiate; a kernel that
    gained or lost an instance would change what the facts read (checked on an edited copy)."""
    metal = next(r for r in B.KERNELS if r.symbol == "kernel_mul_mm_id_map0").facts[0]
    assert B.read_fact(pinned_sources[metal.file], metal) == B.METAL_K == B.safe_k("metal")
    cuda = next(r for r in B.KERNELS if r.symbol == "ggml_cuda_launch_mm_ids_helper").facts[0]
    assert B.read_fact(pinned_sources[cuda.file], cuda) - {0} == B.CUDA_FAST_K
    edited = pinned_sources[metal.file].replace('"kernel_mul_mm_id_map0_ne20_22"', '"kernel_mul_mm_id_map0_ne20_24"')
    assert B.read_fact(edited, metal) == (B.METAL_K - {22}) | {24}
    wider = pinned_sources[cuda.file].replace("case 32:", "case 12:\n launch_mm_ids_helper<12>(ids, x);\n case 32:")
    assert B.read_fact(wider, cuda) != cuda.expect


def test_safe_k_per_backend():
    assert B.safe_k("metal") == B.METAL_K
    assert all(B.safe_k(b) is None for b in ("cpu", "cuda", "vulkan"))
    with pytest.raises(LexiError, match="unknown backend 'rocm'"):
        B.safe_k("rocm")


def test_backend_safe_option_per_backend():
    """`allocate --backend-safe vulkan` parses and leaves every k allowed (vulkan runs any); metal keeps
    only its instances, intersected with --allowed-k."""
    from lexi_gguf.cli.common import allowed_k
    ap = cli.build_parser()
    for backend, allowed, want in (("vulkan", None, None), ("vulkan", "1,3", [1, 3]), ("cuda", None, None),
                                   ("metal", None, sorted(B.METAL_K)), ("metal", "1,3,5,7", [1, 5])):
        args = ap.parse_args(["allocate", "s.json", "-o", "p.json", "--total", "9", "--backend-safe", backend]
                             + (["--allowed-k", allowed] if allowed else []))
        assert allowed_k(args) == want, (backend, allowed)
    with pytest.raises(SystemExit):
        ap.parse_args(["allocate", "s.json", "-o", "p.json", "--total", "9", "--backend-safe", "rocm"])


def test_docs_show_the_table():
    assert B.markdown() in (ROOT / "docs" / "backends.md").read_text(), \
        "docs/backends.md does not hold lexi_gguf.method.backends.markdown(): paste it in"
