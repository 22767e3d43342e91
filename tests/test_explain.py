"""`mixopt explain`, report.html and `mixopt diff` on plans of the tiny real model, SAE and sources."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixopt.cli import cli

PLANTED = "<script>alert(1)</script> [bold]not markup[/bold]"
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _plan(recipe: Path, out: Path, budget: int) -> Path:
    result = CliRunner().invoke(cli, ["plan", str(recipe), "--out", str(out), "--budget", str(budget)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def planted(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace with a `<script>` (and rich markup) planted in every row of the law source."""
    root = tmp_path_factory.mktemp("planted")
    for name in ("model", "sae"):
        (root / name).symlink_to(workspace.parent / name)
    shutil.copytree(workspace.parent / "data", root / "data")
    law = root / "data" / "law.jsonl"
    rows = [json.loads(line) for line in law.read_text().splitlines()]
    law.write_text("".join(json.dumps({"text": f"{PLANTED} {r['text']}"}) + "\n" for r in rows))
    (root / "recipe.yaml").write_text(workspace.read_text())
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def run(planted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _plan(planted, tmp_path_factory.mktemp("runs") / "b60", 60)


@pytest.fixture(scope="module")
def run40(planted: Path, run: Path) -> Path:
    return _plan(planted, run.parent / "b40", 40)  # same recipe and features (cached), another budget


def _explain(*args: str):
    return CliRunner().invoke(cli, ["explain", *args])


# ------------------------------------------------------------------------------------------ explain


def test_explain_json__has_the_documented_keys_and_the_numbers_of_scores_json(run: Path) -> None:
    result = _explain(str(run), "--format", "json")
    assert result.exit_code == 0, result.output
    ex = json.loads(result.output)
    assert set(ex) >= {"scorer", "caveat", "target", "domains", "latents", "terms_are_score", "target_count"}
    scores = json.loads((run / "scores.json").read_text())
    allocation = json.loads((run / "allocation.json").read_text())
    by_score = sorted(scores["domains"], key=lambda d: -d["score"])
    assert [d["name"] for d in ex["domains"]] == [d["name"] for d in by_score]
    counts = {d["name"]: d for d in allocation["domains"]}
    for rank, (d, s) in enumerate(zip(ex["domains"], by_score, strict=True), start=1):
        assert set(d) >= {"rank", "score", "interval", "count", "share", "binding", "latents", "top_examples"}
        assert (d["rank"], d["score"], d["interval"], d["baseline"]) == (rank, s["score"], s["interval"], s["baseline"])
        assert (d["count"], d["share"], d["binding"]) == tuple(
            counts[d["name"]][k] for k in ("count", "share", "binding")
        )
        for e in d["top_examples"]:  # each example's score is its own score in scores.json
            assert e["score"] == s["example_scores"][e["example"]] and e["tokens"] == s["example_tokens"][e["example"]]
        assert [e["score"] for e in d["top_examples"]] == sorted(s["example_scores"], reverse=True)[:3]
    assert ex["target_count"] == allocation["target_count"]
    assert [(x["index"], x["shift"]) for x in ex["latents"]] == [
        (s["index"], s["shift"]) for s in scores["shifted_latents"]
    ]
    latent = ex["latents"][0]
    assert set(latent) == {"index", "shift", "mean_activation", "frequency", "snippets"}
    assert set(latent["mean_activation"]) == {"math", "law", "chem", "code"}
    assert any(latent["snippets"].values())


@pytest.mark.parametrize("scorer", ["act", "act_sq", "icl"])
def test_explain__sae_scorer_terms_sum_to_each_domains_score(planted: Path, scorer: str) -> None:
    from mixopt.pipeline import score_recipe
    from mixopt.recipe import load_recipe

    recipe = planted.parent / f"{scorer}.yaml"
    recipe.write_text(planted.read_text().replace("sts: {", f"sts: {{score: {scorer}, "))
    scores, context = score_recipe(load_recipe(recipe))
    evidence = context["evidence"]
    assert evidence.terms_are_score
    for domain, found in zip(scores.domains, evidence.domains, strict=True):
        assert len(found.terms) == scores.top_k
        assert sum(t.value for t in found.terms) == pytest.approx(domain.score, rel=1e-5)  # the score sums over S
        best = max(range(len(domain.example_scores)), key=lambda i: domain.example_scores[i])
        assert found.top_examples[0].example == best and found.top_examples[0].tokens == domain.example_tokens[best]


def test_explain_text__prints_domains_latents_and_snippets(run: Path) -> None:
    result = _explain(str(run))
    assert result.exit_code == 0, result.output
    ex = json.loads(_explain(str(run), "--format", "json").output)
    assert all(d["name"] in result.output for d in ex["domains"])
    assert str(ex["latents"][0]["index"]) in result.output and "top snippet" in result.output
    law = _explain(str(run), "--domain", "law")
    assert law.exit_code == 0 and "<script>alert(1)</script>" in law.output and "[bold]not markup[/bold]" in law.output
    latent = ex["latents"][0]["index"]
    one = json.loads(_explain(str(run), "--latent", str(latent), "--format", "json").output)
    assert [x["index"] for x in one["latents"]] == [latent] and one["domains"] == []


def test_explain_text__highlights_exactly_the_firing_token() -> None:
    from mixopt.explain import Snippet
    from mixopt.explain_text import FIRING, snippet_text

    text = snippet_text(Snippet("law", 1.5, 0, 7, "The court held", " void", "."), source=False)
    marked = [text.plain[s.start : s.end] for s in text.spans if s.style == FIRING]
    assert marked == ["⟦ void⟧"] and text.plain.startswith("The court held⟦ void⟧.")


def test_explain__unknown_domain_or_old_run_is_one_line_exit_2(run: Path, tmp_path: Path) -> None:
    result = _explain(str(run), "--domain", "astrology")
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "no domain 'astrology'" in result.output and "law" in result.output
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("explain.json", "mixture", "parquet"))
    result = _explain(str(old))
    assert result.exit_code == 2 and "explain.json: missing; re-run `mixopt plan`" in result.output


# ------------------------------------------------------------------------------------------- report


class _Page(HTMLParser):
    """Tags must nest and close; collects scripts, links, image sources, the domain table's rows, text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.scripts = self.domain_rows = 0
        self.urls: list[str] = []
        self.text: list[str] = []
        self._in_domains = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "table" and ("id", "domains") in attrs:
            self._in_domains = True
        if tag == "tr" and self._in_domains and "tbody" in self.stack:
            self.domain_rows += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "table":
            self._in_domains = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report__parses_escapes_planted_script_and_fetches_nothing(run: Path) -> None:
    page_html = (run / "report.html").read_text()
    page = _Page()
    page.feed(page_html)
    page.close()
    assert page.stack == ["html"] or page.stack == []  # every element closed (html's own close tag is optional)
    assert page.scripts == 0 and "<script" not in page_html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    assert PLANTED in "".join(page.text)  # shown as text
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page_html)  # base64 holds "//"
    assert not re.search(r"(https?:|ftp:)?//[a-z0-9]", without_images, re.IGNORECASE)  # no external URL
    assert "@import" not in page_html and "url(" not in page_html
    images = [u for u in page.urls if u.startswith("data:")]
    assert {u for u in page.urls if not u.startswith("data:")} <= {f"#{x}" for x in _anchors(page_html)}
    assert len(images) == 4  # scores, allocation, stability, latents heatmap: inlined, nothing fetched
    for uri in images:
        assert base64.b64decode(uri.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run / "manifest.json").read_text())
    assert page.domain_rows == len(manifest["allocation"])
    assert manifest["recipe"]["sha256"] in page_html and manifest["versions"]["torch"] in page_html


def _anchors(page_html: str) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page_html))


def test_report__escapes_untrusted_text_everywhere() -> None:
    from mixopt.explain import DomainExplanation, Explanation, LatentEvidence, LatentTerm, Snippet, TopExample
    from mixopt.html_report import render_report

    evil = '<img src=x onerror="alert(1)">'
    snippet = Snippet(evil, 1.0, 0, 3, evil, evil, evil)
    latent = LatentEvidence(7, 2.0, {evil: 1.0}, {evil: 0.5}, {evil: [snippet]})
    domain = DomainExplanation(
        evil, 1, 0.5, [0.4, 0.6], 0.1, 0.2, 10, 0.5, 1.0, None, 1.0, [evil], [LatentTerm(7, 0.5)],
        [TopExample(0, 0.5, 3, evil)],
    )  # fmt: skip
    ex = Explanation("act", evil, True, evil, 10, 0.5, 20, "examples", "minimax", {}, [domain], [latent], notes=[evil])
    page = render_report(Path("/nonexistent"), ex, {"recipe": {"file": evil}, "versions": {evil: evil}})
    assert "<img src=x" not in page and 'onerror="' not in page
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 10


# --------------------------------------------------------------------------------------------- diff


def test_diff__a_plan_with_itself_is_identical_exit_0(run: Path) -> None:
    for b in (run, run / "manifest.json"):
        result = CliRunner().invoke(cli, ["diff", str(run), str(b)])
        assert result.exit_code == 0, result.output
        assert "identical" in result.output


def test_diff__two_budgets_list_exactly_the_changed_domains(run: Path, run40: Path) -> None:
    rows = [
        {d["name"]: d["count"] for d in json.loads((r / "allocation.json").read_text())["domains"]}
        for r in (run, run40)
    ]
    changed = {name for name in rows[0] if rows[0][name] != rows[1][name]}  # same scores: only rows can differ
    assert changed, "the budgets should move some domain"
    for fmt in ("table", "markdown", "github"):
        result = CliRunner().invoke(cli, ["diff", str(run), str(run40), "--format", fmt])
        assert result.exit_code == 1, result.output
        listed = {name for name in rows[0] if re.search(rf"(domain |\| |│ ){name}\b", result.output)}
        assert listed == changed, (fmt, result.output)
        assert "allocation.budget" in result.output
    github = CliRunner().invoke(cli, ["diff", str(run), str(run40), "--format", "github"]).output
    assert all(line.startswith("::notice title=mixopt diff") for line in github.splitlines())


def test_diff__bad_input_is_one_line_exit_2(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["diff", str(run), str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no manifest.json there" in result.output
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    result = CliRunner().invoke(cli, ["diff", str(other), str(run)])
    assert result.exit_code == 2 and "not a mixopt plan manifest" in result.output
    assert result.output.strip().count("\n") == 0
