"""Learning curves in the style of the paper's Figs. 5–6: accuracy against training step for every evaluation
set of a run, each beside its majority-class rate (dashed)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["family"], r["operand"], r["c_test"]) for r in metrics})
    families = sorted({k[0] for k in keys}, key=lambda f: [k[0] for k in keys].index(f))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False, sharey=True)
    for ax, fam in zip(axes[0], families):
        for i, key in enumerate(k for k in keys if k[0] == fam):
            rows = sorted((r for r in metrics if (r["family"], r["operand"], r["c_test"]) == key),
                          key=lambda r: r["step"])
            steps = [r["step"] for r in rows]
            color = f"C{i}"
            ax.plot(steps, [100 * r["acc"] for r in rows], color=color, marker="o", ms=2.5,
                    label=f"{key[1]}, c_test={key[2]:g}")
            ax.plot(steps, [100 * r["majority"] for r in rows], color=color, ls="--", lw=0.8)
        ax.set_title(fam)
        ax.set_xlabel("step")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("accuracy % (dashed: majority class)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
