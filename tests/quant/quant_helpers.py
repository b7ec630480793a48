"""Helpers of the quantization tests (imported by the test modules)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(path: Path) -> str:
    """SHA-256 over every file's relative path and bytes: proves a source checkpoint untouched."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()
