"""mixopt: forecast what a fine-tune will move, and build the data mixture that protects it.

Pipeline (one module per stage): recipe -> sources -> model/sae -> features -> sts -> solver -> mixture -> manifest.
"""

__version__ = "0.1.0"

import importlib
from typing import Any

__all__ = ["load_mixture"]


def __getattr__(name: str) -> Any:
    """`mixopt.load_mixture`, imported on first use, so `import mixopt` and `mixopt --help` stay instant and
    the package's own `from mixopt import <submodule>` imports never load it (no import cycle through here)."""
    if name == "load_mixture":
        return importlib.import_module("mixopt.blend").load_mixture
    raise AttributeError(f"module 'mixopt' has no attribute {name!r}")
