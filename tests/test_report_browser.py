"""report.html of the quickstart plan in a real browser: headless Chromium (Debian's `chromium`; `make
chromium` installs it) renders the page; the screenshot is not blank and the domain table has one row
per domain. Slow: it runs the quickstart plan on the embedded model (about 3 min cold on 2 cores)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixopt.cli import cli
from tests.test_explain import _Page

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "headless Chromium is missing: `make chromium` installs Debian's package"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.slow
def test_report__quickstart_renders_in_headless_chromium(tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "quickstart"
    result = CliRunner().invoke(cli, ["plan", str(QUICKSTART), "--budget", "2000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").as_uri()
    shot = tmp_path / "report.png"
    _chromium(tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}", page)
    pixels = matplotlib.image.imread(shot)[..., :3]  # (height, width, rgb) in 0..1
    assert pixels.shape[:2] == (1600, 1280)
    ink = (pixels.min(axis=2) < 0.8).mean()  # share of pixels that are not near-white background
    assert ink > 0.03 and pixels.std() > 0.05, f"blank screenshot: {ink:.1%} ink"
    dom = _chromium(tmp_path / "profile", "--dump-dom", page).stdout  # the document as the browser built it
    parsed = _Page()
    parsed.feed(dom)
    domains = json.loads((out / "manifest.json").read_text())["allocation"]
    assert parsed.domain_rows == len(domains) == 6
    assert all(np.isfinite(d["share"]) for d in domains)
