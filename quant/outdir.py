"""Atomic output directories, shared by every command that writes a checkpoint.

:func:`staged_output_dir` yields a fresh temporary sibling of the output;
the caller writes everything there. On success it is renamed onto the
output, so readers never see a half-written checkpoint; on any error it is
deleted, so bad input never leaves a partial directory behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output_dir(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it onto ``out`` on success.

    An existing empty ``out`` is taken over. A non-empty one is replaced when
    ``replace`` is set (swapped out, then deleted) and is otherwise a
    :class:`FileExistsError`, raised after the temporary directory is removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.rename(tmp, out)
            return
        if not replace:
            raise FileExistsError(f"{out} already exists")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
