"""`OUT/report.html`: one self-contained page that shows a plan and why it came out that way.

Self-contained: CSS inline, plots inlined as base64 PNG (matplotlib, plots.py), no script, no font or
link to fetch, so it opens offline, from a CI artifact or a mail attachment. Every piece of text that
comes from a recipe, a source or a run goes through `html.escape`: source text is untrusted, and a
`<script>` in a row must show as text.

Sections: the domain table (score, interval, allocation, binding constraints), the validation caveat of
the scorer used, the score, allocation and stability plots, the domains x shifted-latents heatmap, why each
domain (the latents and examples that carry its score), a card per shifted latent with its snippets
(firing token marked), and the provenance (recipe sha256, model, SAE, versions).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixopt.explain import DomainExplanation, Evidence, Explanation, LatentEvidence, Snippet
from mixopt.files import write_text

if TYPE_CHECKING:
    from mixopt.scores import Scores
    from mixopt.solver import Allocation

CARD_SNIPPETS = 4  # snippets on a latent card before "per source"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232b;margin:0;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #d5dae1;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}.sub{color:#5b6573;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #e3e7ec;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.caveat{background:#fff6e0;border-left:4px solid #d99a00;padding:10px 14px;margin:16px 0}
.note{color:#5b6573;font-size:13px}
img{max-width:100%;background:#fff;border:1px solid #e3e7ec;margin:6px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:10px 12px}
.card:target{outline:2px solid #3b6ea8}
.snip{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3f5f8;padding:3px 6px;
margin:3px 0;border-radius:3px;white-space:pre-wrap;word-break:break-word}
.snip mark{background:#ffd54a;font-weight:700;padding:0 1px}
.src{color:#3b6ea8;font-size:11px;margin-right:4px}.act{color:#5b6573;font-size:11px;float:right}
.bar{display:inline-block;height:9px;background:#3b6ea8;vertical-align:middle;margin-right:6px}
.example{font:12px/1.4 ui-monospace,monospace;white-space:pre-wrap;background:#f3f5f8;padding:6px 8px;margin:4px 0}
.nw{white-space:nowrap}.binding{color:#a23b2d;font-weight:600}
details summary{cursor:pointer;color:#3b6ea8;font-size:12px}
"""


def esc(value: Any) -> str:
    """Text for HTML: escaped, quotes included (attributes use it too)."""
    return html.escape(str(value), quote=True)


def _num(value: float | None, fmt: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, fmt)


def _interval(interval: list[float] | None, fmt: str = ".4g") -> str:
    if not interval or any(v is None or not np.isfinite(v) for v in interval):
        return "–"
    return f"[{_num(interval[0], fmt)}, {_num(interval[1], fmt)}]"


def _png(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data URI (no file to fetch)."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "↵ ")


def _snippet(s: Snippet, with_source: bool = True) -> str:
    source = f'<span class="src">{esc(s.source)}</span>' if with_source else ""
    return (
        f'<div class="snip">{source}<span class="act">{_num(s.activation, ".3g")}</span>'
        f"{esc(_one_line(s.before))}<mark>{esc(_one_line(s.token))}</mark>{esc(_one_line(s.after))}</div>"
    )


def _rows(rows: Iterable[list[str]]) -> str:
    return "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)


def domain_table(ex: Explanation) -> str:
    """The domain table: one <tbody> row per domain, by rank; the target in the caption."""
    head = (
        "<tr><th class=n>rank</th><th>domain</th><th class=n>score</th><th>95% interval</th>"
        "<th class=n>raw baseline</th><th class=n>similarity</th><th class=n>rows</th><th class=n>share</th>"
        "<th>replay share (95%)</th><th class=n>epochs</th><th>binding</th></tr>"
    )
    body = _rows(
        [
            f"<td class=n>{d.rank}</td>",
            f'<td><a href="#domain-{esc(d.name)}">{esc(d.name)}</a></td>',
            f"<td class=n>{_num(d.score)}</td>",
            f"<td>{_interval(d.interval)}</td>",
            f"<td class=n>{_num(d.baseline)}</td>",
            f"<td class=n>{_num(d.similarity, '.3f')}</td>",
            f"<td class=n>{d.count:,}</td>",
            f"<td class=n>{d.share:.1%}</td>",
            f"<td>{d.replay_share:.1%} {_interval(d.share_interval, '.1%')}</td>",
            f"<td class=n>{d.epochs:.2f}</td>",
            f'<td class="binding">{esc(", ".join(d.binding))}</td>',
        ]
        for d in ex.domains
    )
    caption = (
        f"<caption class=note>target {esc(ex.target)}: {ex.target_count:,} rows ({ex.target_share:.1%}); "
        f"budget {ex.budget:,} {esc(ex.unit)}, objective {esc(ex.objective)}, scorer {esc(ex.scorer)}</caption>"
    )
    return f'<table id="domains">{caption}<thead>{head}</thead><tbody>{body}</tbody></table>'


def _domain_card(d: DomainExplanation, ex: Explanation) -> str:
    total = sum(t.value for t in d.latents)
    label = (
        "shifted latents carrying the score (their terms; all shifted latents sum to the score)"
        if ex.terms_are_score
        else f"shifted latents most active here (mean activation; the {esc(ex.scorer)} score does not use them)"
    )
    latents = "".join(
        f'<li><a href="#latent-{t.index}">latent {t.index}</a> {_num(t.value, ".3g")}'
        + (f" ({t.value / d.score:.0%} of the score)" if ex.terms_are_score and d.score else "")
        + "</li>"
        for t in d.latents
    )
    examples = "".join(
        f'<div class="note">example {e.example}: score {_num(e.score, ".3g")}, {e.tokens} tokens</div>'
        f'<div class="example">{esc(e.text)}</div>'
        for e in d.top_examples
    )
    binding = f' · bound by <span class="binding">{esc(", ".join(d.binding))}</span>' if d.binding else ""
    return (
        f'<div class="card" id="domain-{esc(d.name)}"><h3>{d.rank}. {esc(d.name)}</h3>'
        f"<div>score {_num(d.score)} {_interval(d.interval)} · {d.count:,} rows ({d.share:.1%}){binding}</div>"
        f'<p class="note">{label}{"" if total or not d.latents else " (none fire)"}</p><ul>{latents}</ul>'
        f'<p class="note">examples with the highest own score</p>{examples}</div>'
    )


def _latent_card(latent: LatentEvidence, sources: list[str]) -> str:
    peak = max(latent.mean_activation.values(), default=0.0) or 1.0
    bars = "".join(
        f"<tr><td>{esc(name)}</td><td class=nw>"
        f'<span class=bar style="width:{max(0.0, value) / peak * 80:.0f}px"></span>'
        f"{_num(value, '.3g')}</td><td class=n>{latent.frequency.get(name, 0):.1%}</td></tr>"
        for name in sources
        if (value := latent.mean_activation.get(name)) is not None
    )
    top = "".join(_snippet(s) for s in latent.top_snippets(CARD_SNIPPETS)) or '<p class="note">never fired</p>'
    per_source = "".join(
        f"<p class=note>{esc(name)}</p>" + "".join(_snippet(s, with_source=False) for s in latent.snippets[name])
        for name in sources
        if latent.snippets.get(name)
    )
    return (
        f'<div class="card" id="latent-{latent.index}"><h3>latent {latent.index}</h3>'
        f'<div class="note">shift {_num(latent.shift, ".3g")}</div>'
        f"<table><thead><tr><th>source</th><th>mean activation</th><th class=n>fires on</th></tr></thead>"
        f"<tbody>{bars}</tbody></table>{top}"
        f"<details><summary>top snippets per source</summary>{per_source}</details></div>"
    )


def _provenance(manifest: dict[str, Any]) -> str:
    recipe, model, sae = manifest.get("recipe", {}), manifest.get("model", {}), manifest.get("sae", {})
    dataset = manifest.get("dataset", {})
    rows = [
        ("recipe", recipe.get("file")),
        ("recipe sha256", recipe.get("sha256")),
        ("model", f"{model.get('path')} ({model.get('dtype')}, {model.get('device')})"),
        ("model identity", model.get("identity")),
        ("SAE", f"{sae.get('path')}, layer {sae.get('layer')}"),
        ("SAE identity", sae.get("identity")),
        ("mixture", f"{dataset.get('rows', 0):,} rows, content sha256 {dataset.get('content_sha256')}"),
        *((f"version: {k}", v) for k, v in sorted(manifest.get("versions", {}).items())),
    ]
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _extra_plots(out: Path, ex: Explanation) -> None:
    from mixopt.plots import plot_latent_heatmap, plot_share_intervals

    sources = [ex.target, *(d.name for d in ex.domains)]
    if ex.latents:
        mean = np.array([[latent.mean_activation.get(s, 0.0) for latent in ex.latents] for s in sources])
        plot_latent_heatmap(sources, [x.index for x in ex.latents], mean, out / "plots" / "latents.png")
    if ex.domains:
        plot_share_intervals(
            [d.name for d in ex.domains],
            [d.replay_share for d in ex.domains],
            [d.share_interval for d in ex.domains],
            ex.sensitivity,
            out / "plots" / "stability.png",
        )


def render_report(out: Path, ex: Explanation, manifest: dict[str, Any]) -> str:
    """The page, with the PNGs under `out/plots` inlined."""
    plots = out / "plots"
    sources = [ex.target, *(d.name for d in ex.domains)]
    notes = "".join(f"<li>{esc(n)}</li>" for n in ex.notes)
    title = f"mixopt plan: {ex.target} + {len(ex.domains)} replay domains"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head><body><main>
<h1>{esc(title)}</h1>
<p class="sub">{ex.budget:,} {esc(ex.unit)}; scored by <b>{esc(ex.scorer)}</b>; allocated by {esc(ex.objective)}.
Higher score: forecast to move more, so more replay.</p>
<div class="caveat"><b>Validation caveat ({esc(ex.scorer)}).</b> {esc(ex.caveat)}</div>
<h2>Domains</h2>
{domain_table(ex)}
<p class="note">binding: constraints at their bound (the solver would have moved the share past them).
Replay share (95%): the interval of the share over bootstrap re-solves on resampled scores.</p>
<ul class="note">{notes}</ul>
<h2>Scores and allocation</h2>
{_png(plots / "sts.png", "score per domain and raw baseline")}
{_png(plots / "allocation.png", "share of the mixture per part")}
<h2>Stability</h2>
{_png(plots / "stability.png", "replay share per domain with bootstrap intervals and sensitivity")}
<h2>Shifted latents by domain</h2>
<p class="note">The latents whose activations moved most when the model saw target demonstrations; a column
shows on which sources that latent fires (mean activation divided by its largest over the sources).</p>
{_png(plots / "latents.png", "sources by shifted latents heatmap")}
<h2>Why each domain</h2>
<div class="cards">{"".join(_domain_card(d, ex) for d in ex.domains)}</div>
<h2>Shifted latents</h2>
<p class="note">One card per shifted latent, largest shift first: where it fires, and the tokens it fires on
most (marked) with the text before them.</p>
<div class="cards">{"".join(_latent_card(latent, sources) for latent in ex.latents)}</div>
<h2>Provenance</h2>
{_provenance(manifest)}
</main></body></html>
"""


def write_report(out: Path, ex: Explanation, manifest: dict[str, Any]) -> None:
    """Write the extra plots (plots/latents.png, plots/stability.png) and `out/report.html`."""
    _extra_plots(out, ex)
    write_text(out / "report.html", render_report(out, ex, manifest))


def write_explanation(
    out: Path, scores: Scores, allocation: Allocation, evidence: Evidence, manifest: dict[str, Any]
) -> None:
    """What `plan` writes to explain itself: `out/explain.json` (the evidence `mixopt explain` reads beside
    scores.json and allocation.json), the extra plots and `out/report.html`."""
    evidence.save(out / "explain.json")
    write_report(out, Explanation.build(scores, allocation, evidence), manifest)
