"""Validation report: every table (terminal) and plot (PNG) of `mixopt validate`, and `validation.json`.
Reads the report record only, so a finished run can be re-reported without a model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixopt import stats
from mixopt.files import write_json
from mixopt.tables import render_table
from mixopt.validation.analysis import Cells, Record, primary_metric, reliable_metrics
from mixopt.validation.sweep import best_row


def _r(value: float | None) -> str:
    """A correlation-like number; None (a NaN read back from validation.json) and NaN print as n/a."""
    return "   n/a" if value is None or not np.isfinite(value) else f"{value:+.2f}"


def _rci(stat: Record) -> str:
    lo, hi = stat["ci"]
    return f"{_r(stat['r'])} [{_r(lo)},{_r(hi)}]"


def report_table(report: Record) -> str:
    """The terminal summary: fine-tunes, metric reliabilities, pooled correlations, per-source Pearson."""
    lines = [
        f"validation: {len(report['sources'])} sources x {len(report['domains'])} domains, "
        f"{report['split']['eval_items']} evaluation items per domain, "
        f"{report['budget']} examples per fine-tune",
        "",
    ]
    finetunes = [
        [name, str(s["finetune"]["steps"]), f"{s['finetune']['losses'][0]:.3f}"]
        + [
            f"{np.mean(s['finetune']['losses'][-10:]):.3f}",
            f"{s['own_nll']['before']:.3f}",
            f"{s['own_nll']['after']:.3f}",
        ]
        for name, s in report["sources"].items()
    ]
    header = ["source", "steps", "first loss", "last 10 loss", "own NLL before", "after"]
    lines.append(render_table(header, finetunes, right={1, 2, 3, 4, 5}))
    threshold = report["min_reliability"]
    lines += ["", f"split-half reliability (Spearman-Brown; a change counts at >= {threshold:g})"]
    reliability = [
        [
            m,
            _r(info["reliability"]["level"]),
            _r(info["reliability"]["change_pooled"]),
            "yes" if info["reliable"] else "no",
        ]
        for m, info in report["metrics"].items()
    ]
    lines.append(render_table(["metric", "level", "change", "counts"], reliability, right={1, 2}))
    shown = reliable_metrics(report)
    if not shown:
        shown = list(report["metrics"])
        lines += ["", f"no metric's change reaches reliability {threshold:g}: the correlations below are noise-level"]
    for m in shown:
        lines += ["", *_metric_table(report, m)]
    if report.get("compare"):
        lines += ["", compare_table(report["compare"])]
    if report.get("sweep"):
        lines += ["", sweep_table(report["sweep"])]
    return "\n".join(lines)


def _metric_table(report: Record, metric: str) -> list[str]:
    pooled = report["correlations"][metric]["pooled"]
    n = next(iter(pooled["scores"].values()))["abs"]["n"]
    within = report["correlations"][metric]["within"]["scores"]
    rows = [
        [name, _rci(corr["abs"]["pearson"]), _rci(corr["abs"]["spearman"]), _rci(corr["signed"]["pearson"])]
        + [_rci(corr["signed"]["spearman"]), _rci(within[name]["abs"]["pearson"])]
        for name, corr in pooled["scores"].items()
    ]
    header = ["score", "|change| Pearson", "|change| Spearman", "change Pearson", "change Spearman"]
    lines = [
        f"{metric}: correlation over {n} source x domain cells (95% intervals resample domains)",
        render_table([*header, "within-source |change| r"], rows, right={1, 2, 3, 4, 5}),
    ]
    for variant, corr in pooled.get("partial_given_similarity", {}).items():
        lines.append(
            f"partial r({variant}, |change| | similarity) = {_rci(corr['abs'])}; "
            f"r({variant}, change | similarity) = {_rci(corr['signed'])}"
        )
    by_source = report["correlations"][metric]["by_source"]
    lines.append(
        "per source, Pearson with |change|: "
        + "; ".join(
            f"{s}: " + ", ".join(f"{k} {_r(v['abs']['pearson']['r'])}" for k, v in info["scores"].items())
            for s, info in by_source.items()
        )
    )
    return [*lines, verdict(report, metric)]


def verdict(report: Record, metric: str) -> str:
    """One line: which score forecasts |change| best here, and whether STS adds anything beyond similarity."""
    pooled = report["correlations"][metric]["pooled"]
    r = {k: v["abs"]["pearson"]["r"] for k, v in pooled["scores"].items()}
    finite = {k: v for k, v in r.items() if v is not None and np.isfinite(v)}
    if not finite:
        return "verdict: no score correlates (too few cells)"
    best = max(finite, key=lambda k: finite[k])
    line = f"verdict: best forecaster of |change| is {best} (Pearson {_r(finite[best])})"
    sts_name = report["sts_score"]
    partial = pooled.get("partial_given_similarity", {}).get(sts_name)
    if partial is not None:
        lo, hi = partial["abs"]["ci"]
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
            adds = (
                "adds signal beyond" if lo > 0 else "points the wrong way beyond" if hi < 0 else "adds nothing beyond"
            )
            line += f"; STS {sts_name} {adds} similarity (partial r {_rci(partial['abs'])})"
    return line


def _vci(stat: Record, key: str = "value") -> str:
    lo, hi = stat["ci"]
    return f"{stat[key]:+.4f} [{lo:+.4f},{hi:+.4f}]"


COMPARE_ROWS = {
    "mean_change": "mean change",
    "worst_change": "worst domain's change",
    "target_gain_nll": "target held-out NLL drop",
}


def compare_table(compare: Record) -> str:
    """The regime choice; the recipe's metric in full (each domain's change under each mixture, mean over its
    seeds); then, for every metric, each mixture's statistics and each mixture minus uniform (paired over
    items, seed noise added), with the issue's bar on the recipe's metric."""
    primary = compare["by_metric"][compare["metric"]]
    mixtures = primary["mixtures"]
    names = list(mixtures)
    regime = compare.get("regime", {})
    lines = []
    if regime:
        candidates = ", ".join(
            f"{k}: uniform's worst {c['domain']} {c['value']:+.4f} [{c['ci'][0]:+.4f},{c['ci'][1]:+.4f}]"
            f"{' (clear forgetting)' if c['clear_forgetting'] else ''}"
            for k, c in regime["candidates"].items()
        )
        lines.append(f"replay fraction {regime['replay_fraction']:.0%}: {regime['reason']}; {candidates}")
    if compare.get("not_run"):
        lines.append(f"not run yet: {', '.join(compare['not_run'])}")
    domains = list(mixtures[names[0]]["per_domain"])
    per_domain = [[d, *(f"{mixtures[n]['per_domain'][d]:+.4f}" for n in names)] for d in domains]
    lines += [
        f"mixture comparison at the same budget, {compare.get('seeds', 1)} seed(s) per mixture, forecast "
        f"{compare.get('forecast')}; 95% intervals resample items (differences also add seed noise)",
        render_table(
            [f"change in {_metric_label(primary)}", *(f"{n} (x{mixtures[n]['seeds']})" for n in names)],
            per_domain,
            right=set(range(1, len(names) + 1)),
        ),
        *_compare_rows(primary, list(COMPARE_ROWS)),
    ]
    for metric, summary in compare["by_metric"].items():
        if metric != compare["metric"]:
            lines += ["", f"change in {_metric_label(summary)}", *_compare_rows(summary, list(COMPARE_ROWS))]
    return "\n".join(lines)


def _metric_label(summary: Record) -> str:
    return f"{summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} is better)"


def _compare_rows(summary: Record, keys: list[str]) -> list[str]:
    """Each mixture's statistics (one row per key), then each mixture minus uniform (one column per key) with
    the seed noise and the bar (30% less worst-domain forgetting, interval excluding 0, target gain kept)."""
    mixtures = summary["mixtures"]
    statistics = [[COMPARE_ROWS[k], *(_vci(m[k]) for m in mixtures.values())] for k in keys]
    noise = summary.get("seed_noise") or {}
    seed_line = "seed noise (sd between seeds of one mixture, pooled): " + ", ".join(
        f"{COMPARE_ROWS[k]} {_num(noise.get(k))}" for k in keys
    )
    differences = []
    for mixture, diff in summary["versus_uniform"].items():
        bar = diff["bar"]
        reduction = "no forgetting" if bar["reduction"] is None else f"{bar['reduction']:+.0%}"
        differences.append(
            [
                f"{mixture} - uniform",
                *(_vci(diff[k], "difference") for k in keys),
                reduction,
                "yes" if bar["passes"] else "no",
            ]
        )
    header = ["paired difference", *(COMPARE_ROWS[k] for k in keys), "forgetting cut", "bar"]
    return [
        render_table(["", *mixtures], statistics, right=set(range(1, len(mixtures) + 1))),
        seed_line,
        render_table(header, differences, right=set(range(1, len(keys) + 3))),
    ]


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def sweep_table(sweep: Record) -> str:
    reference = sweep.get("reference", "act")
    rows = []
    for r in sweep["rows"]:
        p, w = r["pooled"], r["within"]
        versus = r.get("versus_reference", {"difference": None, "ci": [None, None]})
        rows.append(
            [r["setting"], r["scorer"], _rci(p["abs"]["pearson"]), _rci(p["abs"]["spearman"])]
            + [_rci(w["abs"]["spearman"]), _rci(p["signed"]["pearson"])]
            + [_rci({"r": versus["difference"], "ci": versus["ci"]})]
        )
    header = ["setting", "scorer", "|change| Pearson", "|change| Spearman", "within |change| Spearman"]
    lines = [
        f"sweep: every setting against the change in {sweep['metric']} (95% intervals resample domains; "
        f"the last column is paired, against the recipe's {reference})",
        render_table([*header, "change Pearson", f"within minus {reference}"], rows, right={2, 3, 4, 5, 6}),
    ]
    best = best_row(sweep)
    lines.append(f"best within-source forecaster of |change|: {best['scorer']} at {best['setting']}; {_beats(best)}")
    if sweep.get("verdict"):
        lines += ["", verdict_table(sweep["verdict"])]
    if sweep.get("best_across_metrics"):
        lines.append(
            f"the same row on every reliable metric (within-source |change| Spearman; minus {reference}, paired; "
            "share of resamples where it is not above; per source):"
        )
        for m, v in sweep["best_across_metrics"].items():
            per_source = ", ".join(f"{s} {_r(r)}" for s, r in v["by_source"].items())
            lines.append(
                f"  {m:<12} {_r(v['r'])} ({reference} {_r(v['reference_r'])})  "
                f"{_rci({'r': v['difference'], 'ci': v['ci']})}  {v['share_not_above']:.3f}  {per_source}"
            )
    return "\n".join(lines)


def verdict_table(verdict: Record) -> str:
    """Round 2's rule (`validation.verdict`): every row on the signed criterion, its cost, and the outcome."""
    setting, scorer = verdict["reference"]
    rows = []
    for r in sorted(verdict["rows"], key=lambda r: -np.nan_to_num(r["signed"]["r"], nan=-np.inf)):
        cost = r["cost"]
        rows.append(
            [r["setting"], r["scorer"], _rci(r["signed"]), _rci(r["absolute"]), _rci(r["versus"])]
            + [f"{cost['tokens']:.1%} / {cost['seconds']:.1%}" if cost else "-"]
            + ["reverses" if r["reverses"] else "", "yes" if r["passes"] else ""]
        )
    header = ["setting", "scorer", "signed (worse +)", "|change|", f"minus {scorer}", "cost: tokens / time"]
    shipped = tuple(verdict.get("shipped_default") or verdict["reference"])
    stand_in = (
        f" (a stand-in: the shipped default is {shipped[1]} at {shipped[0]}, a setting this sweep did not run)"
        if shipped != tuple(verdict["reference"])
        else ""
    )
    chosen = verdict["default"]
    outcome = (
        f"the rule picks {chosen['scorer']} at {chosen['setting']}"
        if chosen
        else f"no row passes: the default stays {scorer} ({setting})"
    )
    return "\n".join(
        [
            f"verdict (docs/validation.md, round 2): within-source Spearman with the change in {verdict['metric']}, "
            f"worse = positive; paired against the default {scorer} at {setting}{stand_in}; a row passes when "
            f"that interval is above 0, it costs at most {verdict['max_cost_share']:.0%} of the fine-tune "
            "(training tokens and time) and no other reliable metric reverses its sign",
            render_table([*header, "sign flips", "passes"], rows, right={2, 3, 4, 5}),
            outcome,
        ]
    )


def _beats(row: Record) -> str:
    """Whether a row's edge over the recipe's scorer is more than resampling noise (paired interval)."""
    lo, hi = row.get("versus_reference", {}).get("ci", [None, None])
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "no paired interval"
    if lo > 0:
        return "better than the recipe's scorer beyond resampling noise"
    if lo == hi == 0:
        return "identical to the recipe's scorer on every resample"
    return "not distinguishable from the recipe's scorer (the paired interval includes 0)"


def plot_scatter(
    source: str,
    domains: Sequence[str],
    scores: dict[str, np.ndarray],
    delta: np.ndarray,
    metric: str,
    sts_name: str,
    path: Path,
) -> None:
    """One source: its STS and its centered similarity against each domain's change, points labelled."""
    from mixopt.plots import plt, save_figure

    panels = [name for name in (sts_name, "similarity") if name in scores]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        ax.scatter(scores[name], delta, color="#3b6ea8", s=18)
        for x, y, label in zip(scores[name], delta, domains, strict=True):
            ax.annotate(label, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        r = stats.pearson(scores[name], np.abs(delta))
        ax.set_title(f"{source}: {name} (Pearson with |change| {_r(r)})", loc="left", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel(f"change in {metric} (after - before)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_correlations(report: Record, path: Path) -> None:
    """Pooled Pearson of each score with |change| and change, with 95% intervals, one panel per metric."""
    from mixopt.plots import plt, save_figure

    metrics = reliable_metrics(report) or list(report["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], metrics, strict=True):
        scores = report["correlations"][m]["pooled"]["scores"]
        x = np.arange(len(scores))
        for offset, target, color in ((-0.2, "abs", "#3b6ea8"), (0.2, "signed", "#c4622d")):
            r = np.array([s[target]["pearson"]["r"] for s in scores.values()], dtype=float)
            ci = np.array([s[target]["pearson"]["ci"] for s in scores.values()], dtype=float)  # (scores, 2)
            err = np.abs(np.nan_to_num(np.stack([r - ci[:, 0], ci[:, 1] - r]), nan=0.0))
            ax.bar(
                x + offset,
                np.nan_to_num(r),
                width=0.4,
                yerr=err,
                capsize=3,
                color=color,
                label="|change|" if target == "abs" else "change",
            )
        ax.set_xticks(x, list(scores), rotation=30)
        reliable = "" if report["metrics"][m]["reliable"] else " (unreliable)"
        ax.set_title(f"{m}{reliable}", loc="left", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r, pooled cells (95% interval)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_compare(summary: Record, path: Path) -> None:
    """Each domain's change under each mixture (mean over its seeds), domains ordered by the target-only
    change; the legend carries each mixture's target gain."""
    from mixopt.plots import figure_height, plt, save_figure

    mixtures = summary["mixtures"]
    names = list(mixtures)
    first = mixtures[names[0]]["per_domain"]
    domains = sorted(first, key=lambda d: first[d])
    y = np.arange(len(domains))
    height = 0.8 / len(names)
    colors = ("#9a9a9a", "#5b8c5a", "#c08a3e", "#3b6ea8", "#8e4a9e", "#c0504d")
    fig, ax = plt.subplots(figsize=(8, figure_height(round(len(domains) * (1 + 0.25 * len(names))))))
    for k, (name, color) in enumerate(zip(names, colors * 2, strict=False)):
        m = mixtures[name]
        ax.barh(
            y + (k - (len(names) - 1) / 2) * height,
            [m["per_domain"][d] for d in domains],
            height=height,
            color=color,
            label=f"{name} x{m['seeds']} (target NLL drop {m['target_gain_nll']['value']:+.3f})",
        )
    ax.set_yticks(y, domains, fontsize=7)
    direction = "higher is better" if summary["higher_is_better"] else "lower is better"
    ax.set_xlabel(f"change in {summary['metric']} ({direction}), mean over seeds")
    ax.set_title("Same budget: each mixture's change per domain", loc="left")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, report: Record, matrix: dict[str, np.ndarray], cells: Cells, sts_name: str) -> None:
    """validation.json (atomically) and the plots."""
    metric = primary_metric(report)
    report["primary_metric"] = metric
    for i, source in enumerate(cells.sources):
        plot_scatter(
            source,
            cells.domains,
            {k: v[i] for k, v in matrix.items()},
            cells.delta[metric][i],
            metric,
            sts_name,
            out / "plots" / f"scatter_{source}.png",
        )
    plot_correlations(report, out / "plots" / "correlations.png")
    if report.get("compare"):
        plot_compare(report["compare"]["by_metric"][report["compare"]["metric"]], out / "plots" / "compare.png")
    write_json(out / "validation.json", report, strict=True)
