"""Report renderer of `make test-vulkan` (bench/vulkan_tests.py): per-layer k with every layer on a Vulkan
device, against the same build's CPU backend: the device, each test's outcome and time, and the logit
differences measured beside the margin they must stay under."""
from __future__ import annotations

from .markdown import family, num, table, targets


@family("vulkan", "Vulkan backend: per-layer k on a Vulkan device", "`make test-vulkan` (bench/vulkan_tests.py)",
        "docs/backends.md", "the Vulkan tests (tests/vulkan_offload.py): each stored budget, the budget switch and "
        "custom counts with every layer offloaded, max |logit diff| against the same build's CPU backend")
def _vulkan(d: dict) -> list[str]:
    c, drv = d.get("counts") or {}, d.get("driver") or {}
    head = (f"Device: {d.get('device') or 'none'}"
            + (f" ({drv.get('driverName')}: {drv.get('driverInfo')}, {drv.get('deviceType')}, Vulkan {drv.get('apiVersion')})"
               if drv.get("driverName") else "")
            + f"; {c.get('passed', 0)} of {c.get('tests', 0)} tests passed"
            + (f", {c['failures']} failed" if c.get("failures") else "") + (f", {c['errors']} errors" if c.get("errors") else "")
            + f" in {num(d.get('wall_s'), '.0f')} s (one process, {d.get('threads', '?')} threads).")
    out = [head, table(["test", "outcome", "seconds"], [[f"`{t['test']}`", t["outcome"], num(t.get("seconds"), ".1f")]
                                                        for t in d.get("tests", [])])]
    rows = [m for m in d.get("measured", []) if "max_diff" in m]
    if rows:
        frac = d.get("margin_fraction") or rows[0].get("margin_fraction")
        out.append("Max |logit diff|, Vulkan (every layer offloaded, or half in `partial offload`) vs CPU, same "
                   "build. `of margin`: the largest diff over the smallest logit change from moving one layer's k by "
                   "one at the same counts on the CPU (what a wrong count in a single layer would show at the "
                   "least); a check passes below " + num(frac, "g") + ". `lexi off`: the "
                   "diff with the model's own k and LExI off (upstream's path: the backends' rounding alone):")
        out.append(table(["check", "model", "max diff", "of margin", "lexi off", "least one-layer k change"],
                         [[m["test"], m["model"], num(m["max_diff"], ".2e"), num(m.get("of_margin"), ".3f"),
                           num(m.get("lexi_off_diff"), ".2e") if "lexi_off_diff" in m else "-",
                           num(m.get("one_layer_k_change_min"), ".3f") if "one_layer_k_change_min" in m else "-"]
                          for m in rows]))
    return out + targets(d)
