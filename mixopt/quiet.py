"""Quiet loads: the libraries' own log lines and warnings silenced while a source, model or SAE loads.

When a load fails mixopt says so in one line naming the file and the fix; `datasets`' "Failed to read file
...", huggingface_hub's retry lines or a transformers warning printed beside it only confuse, and on a
successful load they are noise. Silenced are the loggers (and their children) of the libraries mixopt
loads with, and Python warnings, for the block's duration only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIBRARIES = ("datasets", "transformers", "huggingface_hub", "sae_lens", "fsspec", "filelock", "urllib3", "httpx")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Meanwhile, the libraries' loggers pass nothing below CRITICAL and warnings are ignored."""
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
