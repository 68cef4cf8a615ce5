"""GPU backends on a machine without one: the Vulkan build's system packages (present, installed by the
set-up as root with apt-get, or named in one line), `doctor`'s device line, and the one line a load
says where prefetch / repack options meet offloaded layers. The Vulkan build itself and its logits run
in `make test-vulkan` (tests/vulkan_offload.py): too slow for this suite."""
from __future__ import annotations

import subprocess

import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.runtime import build, devices, syspkgs
from lexi_gguf.runtime.options import LoadOptions


@pytest.fixture
def fake_needs(tmp_path, monkeypatch):
    """Vulkan's needs pointed at files under tmp_path: absent until made."""
    needs = tuple(syspkgs.Need(n.package, n.what, (str(tmp_path / n.package),)) for n in syspkgs.NEEDS["vulkan"])
    monkeypatch.setitem(syspkgs.NEEDS, "vulkan", needs)
    monkeypatch.delenv("VULKAN_SDK", raising=False)
    return tmp_path


def test_every_backend_has_cmake_flags_and_a_cli_choice():
    assert build.cmake_args("vulkan")[0] == "-DGGML_VULKAN=ON"
    assert "vulkan" in build.runtime_dir(build.read_pin(), "vulkan").name
    assert syspkgs.missing("cpu") == []        # nothing beyond a compiler and CMake
    assert {n.package for n in syspkgs.NEEDS["vulkan"]} == {"libvulkan-dev", "glslc", "spirv-headers",
                                                            "mesa-vulkan-drivers"}


def test_backend_patch_applies_to_the_pinned_source_and_keys_only_its_backend(tmp_path):
    """The Vulkan build's compat patch (Vulkan headers before VK_EXT_layer_settings) applies without fuzz to
    the pinned ggml-vulkan.cpp; it is part of the Vulkan runtime's cache key, not the CPU's."""
    import hashlib
    import tarfile
    pin = build.read_pin()
    (patch,) = build.backend_patches("vulkan")
    assert build.backend_patches("cpu") == ()
    name = f"llama_cpp_python-{pin.version}/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
    with tarfile.open(build.cache_root() / "sdist" / f"llama_cpp_python-{pin.version}.tar.gz") as tf:
        tf.extractall(tmp_path, members=[tf.getmember(name)], filter="data")
    tree = tmp_path / f"llama_cpp_python-{pin.version}" / "vendor" / "llama.cpp"
    r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(tree), "-i", str(patch)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "fuzz" not in r.stdout and "offset" not in r.stdout, r.stdout
    text = (tree / "ggml/src/ggml-vulkan/ggml-vulkan.cpp").read_text()
    assert text.count("#ifdef VK_EXT_layer_settings") == 1
    cpu_key = hashlib.sha256(" ".join(build.cmake_args("cpu")).encode()).hexdigest()[:6]
    assert build.runtime_dir(pin, "cpu").name.endswith(f"-cpu-{cpu_key}")
    vk_flags = hashlib.sha256(" ".join(build.cmake_args("vulkan")).encode()).hexdigest()[:6]
    assert not build.runtime_dir(pin, "vulkan").name.endswith(vk_flags)      # the patch is in its key


def test_missing_packages_named_in_one_line_without_root(fake_needs, monkeypatch):
    (fake_needs / "glslc").touch()
    monkeypatch.setattr(syspkgs, "can_install", lambda: False)
    assert [n.package for n in syspkgs.missing("vulkan")] == ["libvulkan-dev", "spirv-headers", "mesa-vulkan-drivers"]
    with pytest.raises(LexiError) as e:
        syspkgs.ensure("vulkan")
    msg = str(e.value)
    assert "\n" not in msg and "glslc" not in msg
    assert "apt-get install -y --no-install-recommends libvulkan-dev spirv-headers mesa-vulkan-drivers" in msg


def test_root_with_apt_installs_them(fake_needs, monkeypatch):
    ran = []

    def fake_run(cmd, **kw):
        ran.append(cmd)
        if cmd[:2] == ["apt-get", "install"] and len(ran) > 1:     # the first install fails: stale index
            for p in cmd[4:]:
                (fake_needs / p).touch()
        return subprocess.CompletedProcess(cmd, 0 if len(ran) > 1 else 100)
    monkeypatch.setattr(syspkgs, "can_install", lambda: True)
    monkeypatch.setattr(syspkgs.subprocess, "run", fake_run)
    monkeypatch.delenv("LEXI_GGUF_NO_APT", raising=False)
    got = syspkgs.ensure("vulkan", log=lambda s: None)
    assert got == [n.package for n in syspkgs.NEEDS["vulkan"]]
    assert [c[:2] for c in ran] == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "install"]]
    assert syspkgs.missing("vulkan") == []
    assert syspkgs.ensure("vulkan") == []      # present: nothing run
    assert len(ran) == 3


def test_build_runtime_refuses_before_building(fake_needs, monkeypatch, capsys):
    monkeypatch.setenv("LEXI_GGUF_NO_APT", "1")           # as on a machine where the set-up may not install

    def no_build(*a, **k):
        raise AssertionError("the build started although its packages are missing")
    monkeypatch.setattr(build, "prepare_source", no_build)
    assert cli.main(["build-runtime", "--backend", "vulkan", "--no-tools"]) == 2
    err = capsys.readouterr().err
    assert "the vulkan build needs system packages" in err and "glslc" in err and "Traceback" not in err


def test_doctor_reports_gpu_devices(capsys):
    from lexi_gguf.runtime.llama import doctor
    d = doctor()
    backend = (d["runtime"] or {}).get("backend")
    assert isinstance(d["gpu_devices"], list)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("GPU devices (--n-gpu-layers): "))
    if backend in (None, "cpu"):        # this suite's runtime: no GPU backend compiled in
        assert d["gpu_devices"] == [] and line.endswith(f"none ({backend or 'cpu'} build)")
    else:
        assert all(x["name"] in line for x in d["gpu_devices"])


def test_hint_for_lavapipe(monkeypatch):
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)
    assert "GGML_VK_VISIBLE_DEVICES=0" in devices.vulkan_hint("vulkan", [])
    assert devices.vulkan_hint("cpu", []) is None
    assert devices.vulkan_hint("vulkan", [{"name": "Vulkan0", "description": "x"}]) is None
    monkeypatch.setenv("GGML_VK_VISIBLE_DEVICES", "0")
    assert "mesa-vulkan-drivers" in devices.vulkan_hint("vulkan", [])


LAVAPIPE = [{"backend": "Vulkan", "name": "Vulkan0", "description": "llvmpipe (LLVM 15.0.6, 256 bits)", "type": "gpu"}]


@pytest.mark.parametrize("opts,devs,said", [
    (LoadOptions(n_gpu_layers=99, prefetch="chosen"), [], []),              # a CPU build: all layers stay here
    (LoadOptions(n_gpu_layers=0, prefetch="chosen", repack="on"), LAVAPIPE, []),
    (LoadOptions(n_gpu_layers=99), LAVAPIPE, []),                            # nothing asked that does not apply
    (LoadOptions(n_gpu_layers=-1, prefetch="guess"), LAVAPIPE,
     ["lexi-gguf: prefetch: 4 of 4 layers are on Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)) and are not prefetched "
      "(their experts live in the device's memory); it has nothing to do"]),
    (LoadOptions(n_gpu_layers=3, prefetch="chosen", repack="off"), LAVAPIPE,
     ["lexi-gguf: prefetch: 3 of 4 layers are on Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)) and are not prefetched "
      "(their experts live in the device's memory); it acts on the 1 held here",
      "lexi-gguf: --repack off: 3 of 4 layers are on Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)), in the device's own "
      "layouts; it applies to the weights kept on the CPU (1 of 4 layers, and the token embeddings)"]),
])
def test_offload_notes(laddered_gguf, monkeypatch, capsys, opts, devs, said):
    monkeypatch.setattr(devices, "gpu_devices", lambda: devs)
    monkeypatch.setattr(devices, "_said", set())
    for _ in range(2):                   # said once
        devices.say_offload_notes(laddered_gguf, opts)
    assert capsys.readouterr().err.splitlines() == said


def test_expert_cache_refused_with_offload():
    with pytest.raises(LexiError, match="--expert-cache: it offloads layers"):
        LoadOptions(n_gpu_layers=99, expert_cache="1G")


def test_vulkan_results_render():
    """The results `make test-vulkan` saves render into docs/results.md: device, counts, each measured diff."""
    from lexi_gguf.measure.report import RENDERERS
    d = {"device": "llvmpipe (LLVM 15.0.6, 256 bits)", "driver": {"driverName": "llvmpipe", "driverInfo": "Mesa 22.3.6"},
         "counts": {"tests": 3, "passed": 1, "failures": 1, "errors": 1, "skipped": 0}, "wall_s": 100.0, "threads": 2,
         "tests": [{"test": "t[a]", "outcome": "passed", "seconds": 1.25}, {"test": "t[b]", "outcome": "failed", "seconds": 2},
                   {"test": "t[c]", "outcome": "crashed (signal 11)", "seconds": 3}],
         "measured": [{"test": "custom counts", "model": "m", "margin_fraction": 0.5, "max_diff": 1.5e-5, "of_margin": 6e-5,
                       "one_layer_k_change_min": 0.25},
                      {"test": "stored budgets", "model": "m", "margin_fraction": 0.5, "max_diff": 2e-3, "of_margin": 0.1,
                       "lexi_off_diff": 1.5e-3}],
         "targets_met": {"every test passes": False}}
    text = "\n".join(RENDERERS["vulkan"].render(d))
    assert "Device: llvmpipe (LLVM 15.0.6, 256 bits) (llvmpipe: Mesa 22.3.6" in text
    assert "1 of 3 tests passed, 1 failed, 1 errors in 100 s" in text
    assert "| `t[b]` | failed | 2.0 |" in text and "| `t[c]` | crashed (signal 11) | 3.0 |" in text
    assert "a check passes below 0.5." in text
    assert "| custom counts | m | 1.50e-05 | 0.000 | - | 0.250 |" in text
    assert "| stored budgets | m | 2.00e-03 | 0.100 | 1.50e-03 | - |" in text
    assert "| every test passes | **not met** |" in text
