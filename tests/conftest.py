from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import write_workspace


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fixed seed, and a private mixopt cache per test session (never the user's ~/.cache/mixopt)."""
    torch.manual_seed(0)
    monkeypatch.setenv("MIXOPT_CACHE", str(tmp_path_factory.getbasetemp() / "mixopt-cache"))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe with a tiny real model, SAE and sources (built once per session); returns its path."""
    return write_workspace(tmp_path_factory.mktemp("workspace"))
