"""Files: the one atomic write and the one content digest that every stage uses.

Atomic: a writer fills a temp file in the target's own folder (a unique name per process and call, so two
processes never collide), which is renamed over the target only when the writer returned; a run killed
mid-write leaves the previous file (or none), never half of one.

Digests: sha256 over canonical JSON (keys sorted, `default=str`), fed part by part, so a key over a stream
of examples needs no list of them in memory. Keys already stored in caches and run folders must not change:
every caller keeps the bytes it always hashed (`sort_keys=False` where it never sorted).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a fresh temp path beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite(node: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively: strict JSON."""
    if isinstance(node, dict):
        return {k: finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [finite(v) for v in node]
    if isinstance(node, float | np.floating):
        return float(node) if np.isfinite(node) else None
    if isinstance(node, np.integer):
        return int(node)
    return node


def write_json(path: Path, data: Any, strict: bool = False) -> None:
    """JSON, indented, atomically; `strict`: NaN written as null (`finite`) instead of JSON's NaN extension."""
    text = json.dumps(finite(data) if strict else data, indent=1, default=str, ensure_ascii=False) + "\n"
    write_text(path, text)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Digest:
    """sha256 fed with JSON-serialised parts; `hex(n)` is the first n hex digits."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, part: Any, sort_keys: bool = True) -> Digest:
        self._sha.update(json.dumps(part, sort_keys=sort_keys, default=str).encode())
        return self

    def add_bytes(self, data: bytes) -> Digest:
        self._sha.update(data)
        return self

    def hex(self, length: int = 64) -> str:
        return self._sha.hexdigest()[:length]


def digest(*parts: Any, length: int = 16) -> str:
    """Key of a few JSON-able values (the parts hashed as one JSON list)."""
    return Digest().add(list(parts)).hex(length)


def text_digest(text: str) -> bytes:
    """Raw sha256 of a string: content keys and per-name seeds (the built-in hash is salted per process)."""
    return hashlib.sha256(text.encode()).digest()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap content fingerprint: name, size and the first and last MiB of each file (weights are GBs)."""
    sha = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        sha.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            sha.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            sha.update(f.read(1 << 20))
    return sha.hexdigest()[:16]
