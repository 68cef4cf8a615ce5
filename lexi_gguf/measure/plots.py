"""PNG plots people look at: the sensitivity heatmap with the chosen k, and benchmark/eval charts."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sensitivity_heatmap(sens: dict, out: str | Path, plan: dict | None = None) -> Path:
    """D_j(k) per MoE layer (rows) and k (columns), log colour scale, chosen k marked."""
    import numpy as np
    plt = pyplot()
    moe = [L for L in sens["layers"] if L["moe"]]
    kb = sens["k_base"]
    data = np.array([L["deviation"] for L in moe], dtype=float)
    shown = np.log10(np.maximum(data, data[data > 0].min() * 0.5 if (data > 0).any() else 1e-12))
    fig, ax = plt.subplots(figsize=(3.2 + 0.45 * kb, 1.8 + 0.32 * len(moe)))
    im = ax.imshow(shown, aspect="auto", cmap="viridis", origin="upper")
    ax.set_xticks(range(kb), [str(k) for k in range(1, kb + 1)])
    ax.set_yticks(range(len(moe)), [str(L["index"]) for L in moe])
    ax.set_xlabel("active experts k")
    ax.set_ylabel("layer")
    title = f"LExI sensitivity log10 D(k): {sens.get('arch', '')}"
    if plan:
        counts = plan["expert_used_count"]
        ax.scatter([counts[L["index"]] - 1 for L in moe], range(len(moe)), marker="s", s=60,
                   facecolors="none", edgecolors="red", linewidths=2, label=f"chosen k (total {plan['total']})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 ||Y_k - Y_base||_F")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
