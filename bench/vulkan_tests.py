"""`make test-vulkan`: tests/vulkan_offload.py (per-layer k with every layer on a Vulkan device, against the
same build's CPU backend) run by this interpreter, whose runtime must be the Vulkan build (.venv-vulkan,
which `make test-vulkan` sets up); the outcome saved as bench/results/vulkan-<machine id>.json: each
test's outcome and time, the logit differences measured against their tolerance, the device and its
driver. `lexi-gguf report` renders it into docs/results.md (the Makefile target does both).

Not a bench_*.py: `make bench` runs those in .venv, whose CPU runtime has no Vulkan device.

    GGML_VK_VISIBLE_DEVICES=0 .venv-vulkan/bin/python bench/vulkan_tests.py [--quick] [--force] [-- PYTEST ARGS]

GGML_VK_VISIBLE_DEVICES=0 (the default here when unset) makes ggml use the first Vulkan device even when
it is a CPU-type one such as lavapipe. --quick: the tiny f32 model only; results to out/bench-quick/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/vulkan_tests.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C

TEST_FILE = "tests/vulkan_offload.py"


def driver_info() -> dict:
    """What `vulkaninfo --summary` says of the first device (driver name and version), where installed."""
    try:
        r = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict = {}
    for line in r.stdout.splitlines():
        k, _, v = line.strip().partition("=")
        k = k.strip()
        if k in ("deviceName", "deviceType", "driverName", "driverInfo", "apiVersion", "conformanceVersion") and k not in out:
            out[k] = v.strip()
    return out


def junit(path: Path) -> tuple[dict, list[dict]]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for c in suite.iter("testcase"):
        outcome = next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": c.get("name"), "outcome": {"failure": "failed"}.get(outcome, outcome),
                      "seconds": round(float(c.get("time", 0)), 1)})
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, cases


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    from lexi_gguf.runtime.build import runtime_record
    rec = runtime_record() or {}
    if rec.get("backend") != "vulkan":
        raise SystemExit(f"vulkan_tests: this interpreter's runtime is the {rec.get('backend', 'un-set-up')} build, not "
                         "the Vulkan one: run `make test-vulkan` (it sets up .venv-vulkan) or .venv-vulkan/bin/python")
    run = C.Run(args, "vulkan")
    work = C.WORK / "vulkan"
    work.mkdir(parents=True, exist_ok=True)
    measure = work / "measured.jsonl"
    measure.unlink(missing_ok=True)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    sel = ["-k", "qwen3_moe or device or partial or prefetch"] if args.quick else []
    ids = subprocess.run([*base, "--collect-only", TEST_FILE, *sel, *args.pytest_args], cwd=C.ROOT,
                         capture_output=True, text=True).stdout.split()
    ids = [i for i in ids if i.startswith(TEST_FILE + "::")]
    if not ids:
        raise SystemExit(f"vulkan_tests: pytest collected no test from {TEST_FILE}")
    # one process a test: a crash of the device (a signal) is that test's outcome, not the end of the run
    env = dict(os.environ, LEXI_VULKAN_MEASURE=str(measure))
    cases, rc, t0 = [], 0, time.time()
    for i in ids:
        xml = work / "junit.xml"
        xml.unlink(missing_ok=True)
        print("$ pytest " + i, flush=True)
        t1 = time.time()
        r = subprocess.run([*base, i, f"--junitxml={xml}", *args.pytest_args], cwd=C.ROOT, env=env)
        rc = rc or r.returncode
        if r.returncode < 0 or not xml.exists():
            cases.append({"test": i.split("::", 1)[1], "outcome": f"crashed (signal {-r.returncode})" if r.returncode < 0
                          else f"no report (exit {r.returncode})", "seconds": round(time.time() - t1, 1)})
        else:
            cases += junit(xml)[1]
    wall = time.time() - t0
    counts = {"tests": len(cases), "passed": sum(c["outcome"] == "passed" for c in cases),
              "failures": sum(c["outcome"] == "failed" for c in cases),
              "errors": sum(c["outcome"] not in ("passed", "failed", "skipped") for c in cases),
              "skipped": sum(c["outcome"] == "skipped" for c in cases)}
    measured = [json.loads(x) for x in measure.read_text().splitlines()] if measure.exists() else []
    from lexi_gguf.runtime.devices import gpu_devices
    devs = [d for d in gpu_devices() if d["backend"] == "Vulkan"]
    res = {"device": devs[0]["description"] if devs else None, "devices": devs, "driver": driver_info(),
           "GGML_VK_VISIBLE_DEVICES": os.environ.get("GGML_VK_VISIBLE_DEVICES"), "threads": 2,
           "counts": counts, "wall_s": round(wall, 1), "pytest_exit": rc, "tests": cases, "measured": measured,
           "targets_met": {"every test passes": rc == 0 and counts["passed"] == counts["tests"] > 0}}
    for k in ("memory_free", "memory_total"):
        for d in devs:
            d.pop(k, None)         # this moment's memory, not a property of the run
    run.save(res)
    print(f"vulkan: {counts['passed']}/{counts['tests']} passed in {wall:.0f} s on {res['device']}")
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
