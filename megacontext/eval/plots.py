"""
PNG plots for the report (matplotlib, Agg backend: no display needed, works on headless boxes).

    plot_accuracy_vs_multiple(table, path)   {"<multiple>": {"<method>": acc | None}}: a line per method
    plot_depth_heatmap(grid, path)           {"<multiple>": {"<depth>": acc | None}}: depth x length map
    plot_decode_ms(bench, path)              mc_bench.json: decode ms/token vs history, MegaContext vs full KV

Each writes `path` and returns it. Missing values (None: a method that does not apply there, e.g.
full attention beyond the sequence length) are left out of lines and shown blank in heat maps.
"""
import os


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # before pyplot is imported anywhere: never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _num_key(k):
    try:
        return float(k)
    except ValueError:
        return float("inf")


def plot_accuracy_vs_multiple(table, path, title="Passkey retrieval", ylabel="exact-match accuracy",
                              intervals=None):
    """Accuracy vs history/budget multiple (log2 x axis), one line per method; with `intervals`
    ({"<multiple>": {"<method>": {"ci": [lo, hi]}}}) each point carries its 95 % interval as an error bar."""
    plt = _plt()
    mults = sorted(table, key=_num_key)
    methods = []
    for m in mults:
        methods += [k for k in table[m] if k not in methods]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, meth in enumerate(methods):
        pts = [(float(m), table[m].get(meth), (((intervals or {}).get(m) or {}).get(meth) or {}).get("ci"))
               for m in mults if table[m].get(meth) is not None]
        if pts:
            xs, ys, cis = zip(*pts)
            lo = [y - (ci[0] if ci else y) for y, ci in zip(ys, cis)]
            hi = [(ci[1] if ci else y) - y for y, ci in zip(ys, cis)]
            err = [lo, hi]
            ax.errorbar(xs, ys, yerr=err, marker="o", linestyle="-" if i < 10 else "--", label=meth, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("history / budget")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no method had a number: no legend (and no warning)
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_depth_heatmap(grid, path, title="MegaContext passkey accuracy by needle depth"):
    """Heat map: rows = needle depth, columns = history/budget multiple, cell = accuracy (annotated)."""
    import numpy as np
    plt = _plt()
    mults = sorted(grid, key=_num_key)
    depths = sorted({d for m in mults for d in grid[m]}, key=_num_key)
    z = np.full((len(depths), len(mults)), np.nan)
    for j, m in enumerate(mults):
        for i, d in enumerate(depths):
            v = grid[m].get(d)
            if v is not None:
                z[i, j] = v
    fig, ax = plt.subplots(figsize=(1.2 * len(mults) + 2.4, 0.5 * len(depths) + 1.8))
    im = ax.imshow(z, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
    ax.set_xticks(range(len(mults)), [f"{m}x" for m in mults])
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_xlabel("history / budget")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(mults)):
            if not np.isnan(z[i, j]):
                ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if z[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_decode_ms(bench, path, title="Decode cost at a fixed budget"):
    """ms per generated token vs history length (log-log), MegaContext vs plain full-KV decoding."""
    plt = _plt()
    table = bench["decode_ms_per_token"]
    hs = sorted(table, key=_num_key)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (("megacontext", "MegaContext"), ("full_kv", "full KV cache")):
        pts = [(float(h), table[h].get(key)) for h in hs if table[h].get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, 3, 4 ms rather than 4x10^0
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("history (tokens)")
    ax.set_ylabel("decode ms / token")
    budget = bench.get("config", {}).get("budget")
    ax.set_title(title + (f" (budget {budget})" if budget else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


__all__ = ["plot_accuracy_vs_multiple", "plot_depth_heatmap", "plot_decode_ms"]
