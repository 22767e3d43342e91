"""`mixopt explain` in the terminal: rich tables, the firing token of each snippet highlighted.

Text from sources and recipes goes into `rich.text.Text` objects, never into markup strings, so a
`[bold]` (or anything else) in a source's text prints as itself.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mixopt.explain import DomainExplanation, Explanation, LatentEvidence, Snippet

OVERVIEW_LATENTS = 10  # latents in the overview; `--latent J` shows any
FIRING = "bold black on yellow"


def _interval(interval: list[float] | None, fmt: str = ".4g") -> str:
    if not interval or any(v is None for v in interval):
        return "-"
    return f"[{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def snippet_text(s: Snippet, source: bool = True) -> Text:
    def line(part: str) -> str:
        return part.replace("\r", "").replace("\n", "↵ ")

    text = Text(f"{s.source}: ", style="cyan") if source else Text()
    text.append(line(s.before), style="dim")
    text.append(f"⟦{line(s.token)}⟧", style=FIRING)  # brackets too: piped output has no colours
    text.append(line(s.after), style="dim")
    text.append(f"  ({s.activation:.3g})", style="italic")
    return text


def domain_table(ex: Explanation) -> Table:
    table = Table(title=f"domains by {ex.scorer} (target {ex.target}: {ex.target_count:,} rows, {ex.target_share:.1%})")
    for name, justify in [
        ("rank", "right"), ("domain", "left"), ("score", "right"), ("95% interval", "left"), ("rows", "right"),
        ("share", "right"), ("replay share (95%)", "left"), ("binding", "left"), ("top latents", "left"),
    ]:  # fmt: skip
        table.add_column(name, justify=justify)
    for d in ex.domains:
        table.add_row(
            str(d.rank), Text(d.name), f"{d.score:.4g}", _interval(d.interval), f"{d.count:,}", f"{d.share:.1%}",
            f"{d.replay_share:.1%} {_interval(d.share_interval, '.1%')}", Text(", ".join(d.binding), style="red"),
            ", ".join(str(t.index) for t in d.latents[:3]),
        )  # fmt: skip
    return table


def latent_table(ex: Explanation, latents: list[LatentEvidence]) -> Table:
    table = Table(title="shifted latents (largest shift first)")
    for name in ("latent", "shift", "fires on target", "most active on", "top snippet"):
        table.add_column(name)
    for latent in latents:
        active = max(latent.mean_activation, key=lambda k: latent.mean_activation[k], default="-")
        top = latent.top_snippets(1)
        table.add_row(
            str(latent.index), f"{latent.shift:.3g}", f"{latent.frequency.get(ex.target, 0):.1%}", Text(active),
            snippet_text(top[0]) if top else Text("never fired", style="dim"),
        )  # fmt: skip
    return table


def domain_detail(ex: Explanation, d: DomainExplanation) -> Group:
    binding = f", bound by {', '.join(d.binding)}" if d.binding else ""
    head = Text(f"{d.rank}. {d.name}: {ex.scorer} {d.score:.4g} {_interval(d.interval)}; ", style="bold")
    head.append(f"{d.count:,} rows ({d.share:.1%} of the mixture; replay {d.replay_share:.1%}){binding}")
    parts: list[Text | Table | Panel] = [head]
    how = (
        "the shifted latents' terms sum to the score; the largest:"
        if ex.terms_are_score
        else f"the {ex.scorer} score does not use SAE latents; the shifted latents most active here:"
    )
    parts.append(Text(how, style="italic"))
    by_index = {latent.index: latent for latent in ex.latents}
    for term in d.latents:
        share = f" ({term.value / d.score:.0%} of the score)" if ex.terms_are_score and d.score else ""
        parts.append(Text(f"  latent {term.index}: {term.value:.3g}{share}", style="bold"))
        latent = by_index.get(term.index)
        for s in (latent.snippets.get(d.name, []) if latent else [])[:3]:
            parts.append(Text("    ") + snippet_text(s, source=False))
    parts.append(Text("examples with the highest own score:", style="italic"))
    for e in d.top_examples:
        parts.append(Panel(Text(e.text), title=f"example {e.example}: score {e.score:.3g}, {e.tokens} tokens"))
    return Group(*parts)


def latent_detail(ex: Explanation, latent: LatentEvidence) -> Group:
    table = Table(title=f"latent {latent.index}: shift {latent.shift:.3g}")
    for name, justify in [("source", "left"), ("mean activation", "right"), ("fires on", "right")]:
        table.add_column(name, justify=justify)
    for name, value in latent.mean_activation.items():
        table.add_row(Text(name), f"{value:.3g}", f"{latent.frequency.get(name, 0):.1%}")
    parts: list[Text | Table] = [table]
    for name, snippets in latent.snippets.items():
        if snippets:
            parts.append(Text(f"{name}:", style="bold cyan"))
            parts.extend(Text("  ") + snippet_text(s, source=False) for s in snippets)
    return Group(*parts)


def print_explanation(console: Console, ex: Explanation, domain: str | None, latent: int | None) -> None:
    """The overview, or one domain and/or one latent in detail (an unknown one raises before any output)."""
    chosen_domain = ex.domain(domain) if domain is not None else None
    chosen_latent = ex.latent(latent) if latent is not None else None
    console.print(Text(f"scorer {ex.scorer}: {ex.caveat}", style="yellow"))
    if chosen_domain is None and chosen_latent is None:
        console.print(domain_table(ex))
        console.print(latent_table(ex, ex.latents[:OVERVIEW_LATENTS]))
        console.print(Text("more: --domain NAME, --latent J, or report.html", style="dim"))
        return
    if chosen_domain is not None:
        console.print(domain_detail(ex, chosen_domain))
    if chosen_latent is not None:
        console.print(latent_detail(ex, chosen_latent))
