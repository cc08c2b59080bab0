"""Figures in the paper's style: learning curves (Figs. 5–6), pruning (Fig. 7, Fig. 59 histograms), probes
(Fig. 8), revival (Fig. 9, log x) and attention maps (Fig. 10). Each takes a tool's tidy rows and writes a
PNG atomically; accuracies are drawn beside their majority-class rate (dashed)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    plt = _plt()
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
    return _save(fig, path, title)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str = "", dpi: int = 110, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_probe(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Fig. 8: probe accuracy per layer (B0 = embedding), one panel per target, one line per model."""
    plt = _plt()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False, sharey=True)
    for ax, tgt in zip(axes[0], targets):
        for i, mod in enumerate(models):
            sub = sorted((r for r in rows if r["target"] == tgt and r["model"] == mod), key=lambda r: r["layer_index"])
            ax.plot([r["layer"] for r in sub], [100 * r["acc"] for r in sub], marker="o", color=f"C{i}", label=mod,
                    ls=":" if mod == "random-init" else "-")
        maj = next(r["majority"] for r in rows if r["target"] == tgt)
        ax.axhline(100 * maj, color="grey", ls="--", lw=0.8, label="majority")
        op = next(r["operand"] for r in rows if r["target"] == tgt)
        ax.set_title(f"probe for {tgt} ({op})")
        ax.set_xlabel("layer")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out probe accuracy %")
    return _save(fig, path, title)


def plot_prune(rows: list[dict], histogram: list[dict], path: str | Path, title: str = "") -> Path:
    """Fig. 7: accuracy against K pruned units (O_PT and O_FT at each c_test), and Fig. 59: predicted-class
    histograms on the O_PT set at K = 0, the best K, and the largest K, beside the true answers."""
    plt = _plt()
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 3.6))
    keys = sorted({(r["target"], r["c_test"]) for r in rows})
    for i, (tgt, c) in enumerate(keys):
        sub = sorted((r for r in rows if r["target"] == tgt and r["c_test"] == c), key=lambda r: r["k"])
        op = sub[0]["operand"]
        ax.plot([r["k"] for r in sub], [100 * r["acc"] for r in sub], marker="o", ms=3, color=f"C{i}",
                ls="-" if tgt == "O_PT" else "--", label=f"{tgt} ({op}), c_test={c:g}")
    ax.set_xlabel("units pruned (K)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    pt0 = sorted((r for r in rows if r["target"] == "O_PT" and r["c_test"] == 0.0), key=lambda r: r["k"])
    shown = ["truth"]
    if pt0:
        best = max(pt0, key=lambda r: (r["acc"], -r["k"]))["k"]
        shown += list(dict.fromkeys([pt0[0]["k"], best, pt0[-1]["k"]]))
    classes = sorted({h["class"] for h in histogram if h["k"] in shown},
                     key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    width = 0.8 / len(shown)
    for j, k in enumerate(shown):
        counts = {h["class"]: h["count"] for h in histogram if h["k"] == k}
        hx.bar([i + j * width for i in range(len(classes))], [counts.get(c, 0) for c in classes], width=width,
               label="true answers" if k == "truth" else f"predicted, K={k}", color=f"C{j}")
    hx.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, fontsize=6, rotation=90)
    hx.set_xlabel("class (O_PT set, c_test=0)")
    hx.set_ylabel("count")
    hx.legend(fontsize=7)
    return _save(fig, path, title)


def plot_revival(rows: list[dict], target: float, path: str | Path, title: str = "") -> Path:
    """Fig. 9: O_PT accuracy against steps (log x) for reFT and the baselines; the dotted line is the target."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    names = {"reft": "reFT", "scr+ft": "Scr.+FT", "scr": "Scr."}
    for i, curve in enumerate(dict.fromkeys(r["curve"] for r in rows)):
        sub = sorted((r for r in rows if r["curve"] == curve), key=lambda r: r["step"])
        ax.plot([max(r["step"], 0.5) for r in sub], [100 * r["acc"] for r in sub], marker="o", ms=3,
                color=f"C{i}", label=sub[0].get("label") or names.get(curve, curve))
    ax.axhline(100 * target, color="grey", ls=":", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("reverse fine-tuning step (log; step 0 drawn at 0.5)")
    ax.set_ylabel("O_PT accuracy %")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_attention(pattern, labels: list[str], layers: list[int], path: str | Path, title: str = "",
                   vmax: float = 0.5) -> Path:
    """Fig. 10 style: one heat map per (layer, head); attending (query) token on y, attended (key) on x."""
    plt = _plt()
    n_l, n_h, t, _ = pattern.shape
    size = min(3.2, max(2.0, 0.04 * t))
    fig, axes = plt.subplots(n_l, n_h, figsize=(size * n_h + 1, size * n_l + 0.6), squeeze=False)
    step = max(1, t // 24)
    for i in range(n_l):
        for h in range(n_h):
            ax = axes[i][h]
            im = ax.imshow(pattern[i, h], vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest")
            ax.set_title(f"block {layers[i]}, head {h}", fontsize=7)
            ticks = list(range(0, t, step))
            ax.set_xticks(ticks, [labels[j] for j in ticks], fontsize=4, rotation=90)
            ax.set_yticks(ticks, [labels[j] for j in ticks], fontsize=4)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    return _save(fig, path, title, dpi=130, tight=False)


def plot_ft_grid(curves: list[dict], path: str | Path, title: str = "") -> Path:
    """Figs. 5–6: accuracy on O_FT (top row) and O_PT (bottom row) against fine-tuning iterations, one panel per
    c_test, one line per run. ``curves``: {"label", "rows": [{"step", "operand_key" ("o_pt"|"o_ft"), "c_test",
    "acc"}]}."""
    plt = _plt()
    c_tests = sorted({r["c_test"] for c in curves for r in c["rows"]})
    fig, axes = plt.subplots(2, max(1, len(c_tests)), figsize=(4.4 * max(1, len(c_tests)), 6.2), squeeze=False,
                             sharex=True, sharey=True)
    for col, ct in enumerate(c_tests):
        for row, key in enumerate(("o_ft", "o_pt")):
            ax = axes[row][col]
            for i, c in enumerate(curves):
                sub = sorted((r for r in c["rows"] if r["operand_key"] == key and r["c_test"] == ct),
                             key=lambda r: r["step"])
                ax.plot([r["step"] for r in sub], [100 * r["acc"] for r in sub], color=f"C{i % 10}", marker="o",
                        ms=2, lw=1.2, label=c["label"])
            ax.set_title(f"{'O_FT (Fig. 5)' if key == 'o_ft' else 'O_PT (Fig. 6)'}, C_Te = {ct:g}", fontsize=9)
            ax.set_ylim(-2, 102)
            if row == 1:
                ax.set_xlabel("fine-tuning step")
        axes[0][col].legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("accuracy %")
    axes[1][0].set_ylabel("accuracy %")
    return _save(fig, path, title)


def plot_tracr_signatures(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Fig. 10 analog in numbers: per fine-tuned Counter run the block-1 attention mass on `a` and `b`; per
    Max-identifier run how intact the block-0 sorting head is. ``rows``: {"label", "program", and "attn_a" /
    "attn_b" or "sort_intact"}."""
    plt = _plt()
    cnt = [r for r in rows if "attn_a" in r]
    mx = [r for r in rows if "sort_intact" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    ax = axes[0][0]
    xs = range(len(cnt))
    ax.bar([x - 0.2 for x in xs], [r["attn_a"] for r in cnt], width=0.4, label="mass on a (O_PT)", color="C0")
    ax.bar([x + 0.2 for x in xs], [r["attn_b"] for r in cnt], width=0.4, label="mass on b (O_FT)", color="C1")
    ax.set_xticks(list(xs), [r["label"] for r in cnt], fontsize=7, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("Counter: block-1 head, readout query", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.bar(range(len(mx)), [r["sort_intact"] for r in mx], color="C2")
    ax.set_xticks(list(range(len(mx))), [r["label"] for r in mx], fontsize=7, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("Max-identifier: block-0 sorting head intact (1 = compiled)", fontsize=9)
    return _save(fig, path, title)


def plot_label_histograms(results: list[dict], o_pt: str, o_ft: str, family: str, path: str | Path) -> Path:
    """The label histograms of O_PT and O_FT per spurious rate (the paper's Fig. 16; ``spurious_statistics``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, op in zip(axes, (o_pt, o_ft)):
        for r in results:
            h = r[f"hist_{op}"]
            ax.plot(range(len(h)), [x / r["n"] for x in h], marker="o", ms=3, label=f"c={r['c']:g}")
        ax.set_title(f"{family}({op}) labels")
        ax.set_xlabel("class label")
    axes[0].set_ylabel("fraction")
    axes[1].legend()
    return _save(fig, path)
