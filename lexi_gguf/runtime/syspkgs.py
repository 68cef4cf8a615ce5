"""The system packages a backend's build needs beyond a C++ compiler and CMake, checked before the build
starts and installed by the set-up where the machine allows it (root and apt-get), otherwise named in
one line.

Vulkan (Debian / Ubuntu names): libvulkan-dev (the loader and vulkan.hpp), glslc (compiles ggml's
compute shaders at build time), spirv-headers (ggml-vulkan's CMake asks for its config), and
mesa-vulkan-drivers, the Vulkan drivers of Mesa: AMD and Intel GPUs, and lavapipe, a conformant
software Vulkan device on the CPU (what the Vulkan tests run on where no GPU is at hand). A machine
with a GPU vendor's own driver needs only the first three.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import LexiError


@dataclass(frozen=True)
class Need:
    package: str        # the Debian / Ubuntu package
    what: str           # what the build uses it for
    present: tuple      # any of these paths (a file or a glob) present, or a program on PATH ("bin:NAME")


INCLUDE_DIRS = ("/usr/include", "/usr/local/include")
NEEDS: dict[str, tuple[Need, ...]] = {
    "vulkan": (
        Need("libvulkan-dev", "Vulkan loader and headers", tuple(f"{d}/vulkan/vulkan.hpp" for d in INCLUDE_DIRS)),
        Need("glslc", "shader compiler", ("bin:glslc",)),
        Need("spirv-headers", "SPIR-V headers (CMake config)",
             tuple(f"{p}/{lib}/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake"
                   for p in ("/usr", "/usr/local") for lib in ("share", "lib", "lib/*"))),
        Need("mesa-vulkan-drivers", "Mesa's Vulkan drivers (AMD, Intel, lavapipe on the CPU)",
             ("/usr/share/vulkan/icd.d/*.json", "/etc/vulkan/icd.d/*.json")),
    ),
}


def _present(need: Need) -> bool:
    for p in need.present:
        if p.startswith("bin:"):
            if shutil.which(p[4:]):
                return True
        elif "*" in p:
            if any(Path("/").glob(p.lstrip("/"))):
                return True
        elif Path(p).exists():
            return True
    # a Vulkan SDK unpacked by hand (LunarG's setup-env.sh sets VULKAN_SDK) has all but the driver
    sdk = os.environ.get("VULKAN_SDK")
    return bool(sdk) and need.package in ("libvulkan-dev", "spirv-headers") and Path(sdk, "include", "vulkan").is_dir()


def missing(backend: str) -> list[Need]:
    """The needs of backend's build that this machine lacks ([] for a backend with none listed)."""
    return [n for n in NEEDS.get(backend, ()) if not _present(n)]


def can_install() -> bool:
    """Whether the set-up may install system packages itself: root, with apt-get."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install_command(packages: list[str]) -> list[str]:
    return ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def ensure(backend: str, *, log=print) -> list[str]:
    """Make the system packages backend's build needs present: nothing to do, installed here (root and
    apt-get; `apt-get update` first if the install fails on a stale index), or a LexiError naming them.
    Returns the packages installed."""
    lack = missing(backend)
    if not lack:
        return []
    pkgs = [n.package for n in lack]
    what = ", ".join(f"{n.package} ({n.what})" for n in lack)
    if os.environ.get("LEXI_GGUF_NO_APT") == "1" or not can_install():
        raise LexiError(f"the {backend} build needs system packages this machine lacks: {what}; install them "
                        f"(Debian/Ubuntu: sudo {' '.join(install_command(pkgs))}) and retry")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing the {backend} build's system packages: {' '.join(pkgs)}")
    if subprocess.run(install_command(pkgs), env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(install_command(pkgs), env=env).returncode != 0:
            raise LexiError(f"apt-get could not install {' '.join(pkgs)} (see its output above); install them "
                            f"by hand and retry")
    still = missing(backend)
    if still:
        raise LexiError(f"after apt-get, still missing: {', '.join(n.package for n in still)}; install them and retry")
    return pkgs
