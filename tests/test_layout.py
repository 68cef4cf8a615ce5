"""The package's shape, checked: stages import only stages below them, no two modules import each
other (directly or round a longer circle), no module borrows another's private names, modules stay small, and the ggml struct layout copied into Python matches the pinned
ggml.h (compiled here, so a pin that moves a field fails this test instead of misreading memory)."""
from __future__ import annotations

import ast
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lexi_gguf"
# lowest first: a stage may import itself and the stages before it, never one after it
LAYERS = ["gguf", "runtime", "method", "export", "testbeds", "measure", "caching", "serve", "cli"]
MAX_LINES = 350


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"


def _imports(path: Path, module: str, is_pkg: bool):
    """(line, imported module, names) for every import in the file, lazy ones inside functions too."""
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lexi_gguf" else None


def test_stages_import_only_stages_below_them():
    back = []
    for path, module, is_pkg in _modules():
        src = _stage(module)
        if src is None:
            continue
        for line, target, names in _imports(path, module, is_pkg):
            dst = _stage(target)
            if dst is None and target == "lexi_gguf":      # `from .. import X`: X may be a stage
                dst = next((n for n in names if n in LAYERS), None)
            if dst is not None and dst != src and LAYERS.index(dst) > LAYERS.index(src):
                back.append(f"{path.relative_to(PKG.parent)}:{line} ({src}) imports {target} ({dst})")
    assert not back, "lower stages import higher ones:\n" + "\n".join(back)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, lazy imports too. `from P import n` is an edge to the
    module P.n where there is one, else to P; a package counts as its __init__ only where a name defined
    there is imported (Python imports the parent package first either way, but that alone is no circle)."""
    modules = {module: (path, is_pkg) for path, module, is_pkg in _modules()}
    graph = {}
    for module, (path, is_pkg) in modules.items():
        deps = set()
        for _, target, names in _imports(path, module, is_pkg):
            if not target.startswith("lexi_gguf"):
                continue
            subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
            deps |= subs
            if (len(subs) < len(names) or not names) and target in modules:
                deps.add(target)
        graph[module] = deps - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports: the strongly connected components with more than one module (Tarjan),
    each as one path round it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_circle(graph, sorted(comp)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _circle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One path from comp[0] back to itself inside the component (breadth first: the shortest)."""
    inside, start = set(comp), comp[0]
    prev, todo = {start: None}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & inside):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w not in prev:
                prev[w] = v
                todo.append(w)
    return comp


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    circles = _cycles(_import_graph())
    assert not circles, "modules that import each other (lazy imports count: break the circle by moving " \
        "what both need into a module both can import):\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_module_imports_another_modules_private_names():
    found = []
    for path, module, is_pkg in _modules():
        for line, target, names in _imports(path, module, is_pkg):
            if target.startswith("lexi_gguf"):
                found += [f"{path.relative_to(PKG.parent)}:{line} {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_modules_stay_small():
    big = [f"{p.relative_to(PKG.parent)}: {n} lines" for p, _, _ in _modules()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(big)


def test_ggml_tensor_layout_matches_the_pinned_header(tmp_path, llama_cpp_dir):
    from lexi_gguf.runtime import graph
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: the runtime build needs one too (apt-get install gcc)")
    include = llama_cpp_dir / "ggml" / "include"
    assert (include / "ggml.h").exists(), f"the pinned tree has no {include / 'ggml.h'}"
    fields = [name for name, _ in graph.GGMLTensor._fields_]
    prog = tmp_path / "layout.c"
    prog.write_text("#include <stddef.h>\n#include <stdio.h>\n#include \"ggml.h\"\nint main(void) {\n" +
                    "".join(f'  printf("{f} %zu %zu\\n", offsetof(struct ggml_tensor, {f}), '
                            f'sizeof(((struct ggml_tensor *)0)->{f}));\n' for f in fields) +
                    '  printf("GGML_F32 %d\\nGGML_F16 %d\\nGGML_I32 %d\\n", GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32);\n'
                    "  return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", str(include), str(prog), "-o", str(exe)], check=True, capture_output=True)
    out = dict(line.split(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                             check=True).stdout.splitlines())
    for f in fields:
        c_off, c_size = map(int, out[f].split())
        py = getattr(graph.GGMLTensor, f)
        assert (py.offset, py.size) == (c_off, c_size), f"ggml_tensor.{f}: ctypes {py.offset}+{py.size}, ggml.h {c_off}+{c_size}"
    for name in ("GGML_F32", "GGML_F16", "GGML_I32"):
        assert getattr(graph, name) == int(out[name]), f"{name} differs from ggml.h"
    assert ctypes.sizeof(ctypes.c_void_p) == 8   # the layout above is the 64-bit one


def test_architecture_table_is_up_to_date():
    """docs/architectures.md is rendered by `make docs`, never by a test run: here it must be exactly
    what the registry renders with the results it records, every architecture passing every column."""
    from lexi_gguf.method.archs import ARCHS
    from lexi_gguf.testbeds import archdoc
    text = (PKG.parent / "docs" / "architectures.md").read_text()
    results, machine = archdoc.parse(text)
    assert sorted(results) == sorted(ARCHS), "the registry changed: run `make docs`"
    failed = [f"{a}: {c} {v}" for a, cols in results.items() for c, v in cols.items() if not v.startswith("pass")]
    assert not failed, failed
    assert archdoc.render(results, machine) == text, "docs/architectures.md is stale: run `make docs`"
