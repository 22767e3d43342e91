"""Plots for the run's README: STS per domain beside its raw baseline, and the mixture's shares.

Agg backend (no display needed), PNG at 120 dpi, no software/time stamp in the metadata, so the same
numbers give the same bytes on the same machine.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> plot_scores(["law", "math"], [0.8, 0.3], [0.1, 0.2], folder / "sts.png", "similarity")
    >>> plot_allocation(["gsm8k", "law", "math"], [0.5, 0.3, 0.2], folder / "allocation.png", target="gsm8k")
    >>> (folder / "sts.png").stat().st_size > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Sized
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

DPI = 120
MAX_BARS = 40  # beyond this the labels overlap; the plot shows the top ones and says so
STS_COLOR, RAW_COLOR, DOMAIN_COLOR, TARGET_COLOR = "#3b6ea8", "#9a9a9a", "#5b8c5a", "#c4622d"


def _top(names: Sequence[str], key: np.ndarray) -> tuple[np.ndarray, str]:
    """Indices of the bars to draw, largest key at the top, and a title suffix when some are cut."""
    order = np.argsort(-np.nan_to_num(key, nan=-np.inf), kind="stable")[:MAX_BARS]
    suffix = f" (top {MAX_BARS} of {len(names)})" if len(names) > MAX_BARS else ""
    return order[::-1], suffix  # barh draws bottom-up


def figure_height(bars: int) -> float:
    return max(2.5, 0.32 * bars + 1.2)


def save_figure(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def _check(names: Sequence[str], **columns: Sized) -> None:
    for label, values in columns.items():
        if len(values) != len(names):
            raise ValueError(f"{label} has {len(values)} values for {len(names)} names")
    if not names:
        raise ValueError("nothing to plot: no names")


SCORE_LABELS = {
    "act": "STS act (shifted SAE latents)",
    "act_sq": "STS act_sq (shifted SAE latents)",
    "icl": "STS icl (shifted SAE latents)",
    "raw": "raw (shifted residual dimensions)",
    "similarity": "centered similarity to the target",
    # the forecasts of DESIGN.md 3b (every selectable scorer needs a label: `plan` plots the one it used)
    "probe": "probe: loss change after a pilot fine-tune (nats)",
    "grad": "grad: first-order loss change under the target's update (nats)",
    "probe_act": "probe_act: STS act on the pilot's measured shift",
}


def plot_scores(names: Sequence[str], sts: Sequence[float], raw: Sequence[float], path: Path, score: str) -> None:
    """Horizontal bars of the recipe's score (`score`: an STS variant or a baseline) per domain, highest
    first, with the raw-activation baseline in a panel beside.

    Two panels sharing the domain axis, each on its own scale: STS and the raw baseline are sums over
    different spaces (SAE latents vs residual dimensions), so one axis would flatten one of them.
    """
    _check(names, sts=sts, raw=raw)
    sts_values, raw_values = np.asarray(sts, dtype=float), np.asarray(raw, dtype=float)
    rows, suffix = _top(names, sts_values)
    y = np.arange(len(rows))
    fig, (left, right) = plt.subplots(
        1, 2, sharey=True, figsize=(10, figure_height(len(rows))), gridspec_kw={"width_ratios": [3, 2]}
    )
    left.barh(y, sts_values[rows], color=STS_COLOR)
    left.set_yticks(y, [names[i] for i in rows])
    left.set_xlabel(SCORE_LABELS[score])
    left.set_title(f"{score} per domain (higher: more exposed)" + suffix, loc="left")
    right.barh(y, raw_values[rows], color=RAW_COLOR)
    right.set_xlabel("raw baseline (residual dimensions)")
    right.set_title("Raw baseline", loc="left")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # small or negative values: long tick labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
        ax.axvline(0, color="black", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    save_figure(fig, path)


def plot_allocation(names: Sequence[str], shares: Sequence[float], path: Path, target: str | None = None) -> None:
    """Horizontal bars of each part's share of the mixture, largest first, labelled in percent.

    `target`: the fine-tuning target's name, drawn in its own colour.
    """
    _check(names, shares=shares)
    values = np.asarray(shares, dtype=float)
    rows, suffix = _top(names, values)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, figure_height(len(rows))))
    colors = [TARGET_COLOR if names[i] == target else DOMAIN_COLOR for i in rows]
    bars = ax.barh(y, values[rows] * 100, color=colors)
    ax.bar_label(bars, labels=[_percent(values[i]) for i in rows], padding=3, fontsize=9)
    ax.set_yticks(y, [f"{names[i]} (target)" if names[i] == target else names[i] for i in rows])
    ax.set_xlabel("share of the mixture (%)")
    ax.set_xlim(0, max(5.0, float(np.nanmax(values[rows])) * 100 * 1.15))  # room for the labels
    ax.set_title("Mixture allocation" + suffix, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    save_figure(fig, path)


def _percent(share: float) -> str:
    if math.isnan(share):
        return "n/a"
    return f"{share:.1%}" if share >= 0.001 or share == 0 else "<0.1%"


HEATMAP_MAX_LATENTS = 40  # columns beyond this get too narrow to label


def plot_latent_heatmap(sources: Sequence[str], latents: Sequence[int], mean: np.ndarray, path: Path) -> None:
    """Sources x shifted latents: each latent's mean activation on each source, divided by its largest
    over the sources, so every column reads "where does this latent fire most" on one 0..1 scale.

    `mean`: (sources, latents), latents in the order given (largest shift first); at most
    HEATMAP_MAX_LATENTS are drawn."""
    _check(sources, mean=mean)
    cols = min(len(latents), HEATMAP_MAX_LATENTS)
    values = np.asarray(mean, dtype=float)[:, :cols]  # (sources, cols)
    peak = values.max(axis=0, keepdims=True)
    relative = np.divide(values, peak, out=np.zeros_like(values), where=peak > 0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * cols + 2.5), max(2.5, 0.36 * len(sources) + 1.6)))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(np.arange(len(sources)), list(sources))
    ax.set_xticks(np.arange(cols), [str(j) for j in latents[:cols]], rotation=90, fontsize=7)
    ax.set_xlabel("shifted latent (largest shift first)")
    suffix = f" (first {cols} of {len(latents)})" if len(latents) > cols else ""
    ax.set_title("Where each shifted latent fires" + suffix, loc="left")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="mean activation / its largest")
    fig.tight_layout()
    save_figure(fig, path)


def plot_share_intervals(
    names: Sequence[str],
    shares: Sequence[float],
    intervals: Sequence[Sequence[float] | None],
    sensitivity: dict[str, dict[str, float]],
    path: Path,
) -> None:
    """Each domain's replay share (dot) with its bootstrap 95% interval (bar; from re-solving on resampled
    scores) and its share when the objective's parameters are halved or doubled (open markers)."""
    _check(names, shares=shares, intervals=intervals)
    y = np.arange(len(names))[::-1]  # first name at the top
    fig, ax = plt.subplots(figsize=(8, figure_height(len(names))))
    for row, interval in zip(y, intervals, strict=True):
        if interval is not None:
            ax.plot([interval[0] * 100, interval[1] * 100], [row, row], color=STS_COLOR, linewidth=3, alpha=0.45)
    ax.scatter(np.asarray(shares) * 100, y, color=STS_COLOR, zorder=3, label="replay share")
    for (label, by_name), marker in zip(sorted(sensitivity.items()), "o^sDv<>", strict=False):
        ax.scatter(
            [by_name.get(n, np.nan) * 100 for n in names], y, marker=marker, facecolors="none",
            edgecolors=RAW_COLOR, zorder=2, label=label,
        )  # fmt: skip
    ax.set_yticks(y, list(names))
    ax.set_xlabel("share of the replay part (%)")
    ax.set_title("Stability: bootstrap 95% intervals and parameter sensitivity", loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
