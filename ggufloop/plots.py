"""Figures without a display: one place for matplotlib's set-up and saving."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .plan import LoopPlan

TRACE_CURVES = [
    ("norm", "hidden-state norm"),
    ("cos_prev", "cos to previous virtual layer"),
    ("rel_change_prev", "relative change to previous layer"),
    ("cos_prev_pass", "cos to same layer, previous pass"),
    ("entropy", "logit-lens entropy (nats)"),
    ("kl_to_final", "KL(final || lens)"),
]


def subplots(*args, **kwargs):
    """matplotlib's subplots on the file-only Agg backend (imported on first use: it is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write and release a figure."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tokens in scripts the font lacks
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    plt.close(fig)


def heatmap(
    grid: dict[tuple[int, int], float],
    base: float,
    n_layer: int,
    title: str,
    path: Path,
    significant: set[tuple[int, int]] = frozenset(),
) -> None:
    """Accuracy per (start, last layer) with the baseline marked on the colour bar, the best cells
    labelled, and the cells in ``significant`` outlined (they differ from the baseline)."""
    from matplotlib.colors import TwoSlopeNorm

    m = np.full((n_layer, n_layer), np.nan)
    for (s, e), acc in grid.items():
        m[s, e - 1] = acc
    fig, ax = subplots(figsize=(8, 7))
    norm = TwoSlopeNorm(
        vcenter=base, vmin=min(np.nanmin(m), base - 1e-6), vmax=max(np.nanmax(m), base + 1e-6)
    )  # white = the baseline
    im = ax.imshow(m, origin="lower", cmap="RdBu", norm=norm)
    cbar = fig.colorbar(im, ax=ax, label="accuracy")
    cbar.ax.axhline(base, color="k", linewidth=2)
    cbar.ax.text(1.05, base, " baseline", transform=cbar.ax.get_yaxis_transform(), va="center", fontsize=8)
    for (s, e), acc in sorted(grid.items(), key=lambda kv: -kv[1])[:5]:
        ax.text(e - 1, s, f"{acc:.3f}", ha="center", va="center", fontsize=7, color="k", fontweight="bold")
    from matplotlib.patches import Rectangle

    for s, e in significant:
        ax.add_patch(Rectangle((e - 1.5, s - 0.5), 1, 1, fill=False, edgecolor="k", linewidth=1.5))
    if significant:
        title += "\noutlined: differs from the baseline (Holm-adjusted McNemar p < 0.05)"
    ax.set_xlabel("last layer of the block (e - 1)")
    ax.set_ylabel("first layer of the block (s)")
    ax.set_title(title, fontsize=10)
    save(fig, path, dpi=120)


def bench_ratios(data: dict, path: Path) -> None:
    """Time over the unlooped model against the ideal ratio, per variant and model."""
    fig, axes = subplots(1, len(data["models"]), figsize=(6 * len(data["models"]), 5), squeeze=False)
    for ax, (model, d) in zip(axes[0], data["models"].items()):
        rows = d["rows"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["prefill_time_ratio"] for r in rows], 0.4, label="prefill")
        ax.bar([i + 0.2 for i in x], [r["decode_time_ratio"] for r in rows], 0.4, label="decode")
        ax.scatter(list(x), [r["ideal_ratio"] for r in rows], color="k", marker="_", s=400, zorder=3, label="ideal")
        ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("time / unlooped time")
        ax.set_title(model)
        ax.legend()
    save(fig, path)


def trace_curves(data: dict, plan: LoopPlan, path: Path) -> None:
    from .trajectory import mean_over_tokens

    fig, axes = subplots(2, 3, figsize=(15, 8))
    m = plan.end - plan.start
    for ax, (key, title) in zip(axes.flat, TRACE_CURVES):
        for t in range(1, plan.count):
            ax.axvspan(plan.start + t * m - 0.5, plan.start + (t + 1) * m - 0.5, color="orange", alpha=0.12 * t)
        for label, run in data["runs"].items():
            y = mean_over_tokens(run[key])
            ax.plot(range(len(y)), y, marker=".", label=f"{label} ({run['plan']})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("virtual layer")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"{Path(data['model']).stem}: mean over {len(data['tokens'])} tokens; shaded: repeated passes", fontsize=11
    )
    save(fig, path)


def logit_lens(run: dict, tokens: list[str], title: str, path: Path) -> None:
    """Virtual layer x token: the logit lens's top token and its probability."""
    prob = np.array([[cell[0][1] for cell in row] for row in run["top"]])
    fig, ax = subplots(figsize=(1.1 * len(tokens) + 2, 0.28 * len(prob) + 2))
    ax.imshow(prob, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for v, row in enumerate(run["top"]):
        for i, cell in enumerate(row):
            ax.text(
                i,
                v,
                repr(cell[0][0])[1:-1][:8],
                ha="center",
                va="center",
                fontsize=6,
                color="white" if cell[0][1] < 0.6 else "black",
            )
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, fontsize=7)
    ax.set_yticks(range(len(prob)), [f"{v}:L{il}" for v, il in enumerate(run["schedule"])], fontsize=6)
    ax.set_xlabel("input token (the lens predicts the next one)")
    ax.set_ylabel("virtual layer : physical layer")
    ax.set_title(title, fontsize=10)
    save(fig, path)


def kld_maps(
    panels: list[tuple[str, dict[tuple[int, int], tuple[float, float]]]],
    title: str,
    path: Path,
) -> None:
    """Per (K, mix) panel, two heat maps over the blocks (first layer s across, block size e - s up): the
    mean KL divergence from the unlooped model (log colour scale shared by every panel; darker: further)
    and the share of tokens with the same top token (linear, shared; darker: fewer), each cell labelled.
    ``panels``: (label, {(s, e): (mean KLD, same-top share)}) in display order."""
    from matplotlib.colors import LogNorm, Normalize

    starts = sorted({s for _, cells in panels for s, _ in cells})
    sizes = sorted({e - s for _, cells in panels for s, e in cells})
    klds = [v[0] for _, cells in panels for v in cells.values()]
    same = [100 * v[1] for _, cells in panels for v in cells.values()]
    positive = [k for k in klds if k > 0]
    low = min(positive) if positive else 1e-6
    kld_norm = LogNorm(vmin=low, vmax=max(max(klds), low * 10))
    same_norm = Normalize(vmin=min(min(same), 99.9), vmax=100.0)
    width = max(4.0, 0.45 * len(starts) + 2.0)
    height = max(1.6, 0.45 * len(sizes) + 1.2)
    fig, axes = subplots(len(panels), 2, figsize=(2 * width, height * len(panels) + 0.8), squeeze=False)
    for row, (label, cells) in zip(axes, panels):
        for ax, which, norm, cmap, fmt in (
            (row[0], 0, kld_norm, "magma_r", lambda v: f"{v:.2g}"),
            (row[1], 1, same_norm, "viridis", lambda v: f"{100 * v:.0f}"),
        ):
            m = np.full((len(sizes), len(starts)), np.nan)
            for (s, e), v in cells.items():
                m[sizes.index(e - s), starts.index(s)] = max(v[0], low) if which == 0 else 100 * v[1]
            im = ax.imshow(m, origin="lower", aspect="auto", cmap=cmap, norm=norm)
            for (s, e), v in cells.items():
                x, y = starts.index(s), sizes.index(e - s)
                shade = norm(m[y, x])
                dark = shade > 0.6 if which == 0 else shade < 0.5
                ax.text(x, y, fmt(v[which]), ha="center", va="center", fontsize=6, color="w" if dark else "k")
            ax.set_xticks(range(len(starts)), [str(s) for s in starts], fontsize=7)
            ax.set_yticks(range(len(sizes)), [str(m) for m in sizes], fontsize=7)
            ax.set_xlabel("first layer of the block (s)", fontsize=8)
            ax.set_ylabel("block size (e - s)", fontsize=8)
            what = "mean KL(unlooped || plan), nats" if which == 0 else "same top token, %"
            ax.set_title(f"{label}: {what}", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.9)
    fig.suptitle(title, fontsize=10)
    save(fig, path, dpi=110)
