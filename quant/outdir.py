"""Atomic output directories, shared by every command that writes a checkpoint.

:func:`staged_output_dir` yields a fresh temporary sibling of the output
(``.NAME.partial-XXXX``); the caller writes everything there. On success it
is renamed onto the output, so readers never see a half-written checkpoint;
on any error it is deleted, so bad input never leaves a partial directory
behind. Besides:

- SIGTERM raises :class:`quant.errors.Interrupted` while the directory is
  staged (SIGINT raises ``KeyboardInterrupt`` anyway), so an interrupted
  run removes its staging folder too; the final swap and the clean-up run
  with both signals blocked.
- Each staging folder is ``flock``-ed by the process that writes it. A run
  that finds an unlocked ``.NAME.partial-*`` (or ``.NAME.old-*``) next to
  its output, left by a run that was killed (``kill -9``, power loss),
  removes it and says so on stderr; a locked one belongs to a live run and
  is left alone.
- The output directory gets the mode ``mkdir`` would give it (``0777``
  minus the umask), not ``mkdtemp``'s ``0700``.
- Running out of space (``ENOSPC``, ``EDQUOT``, ``EFBIG``) while writing is
  one :class:`quant.errors.CLIError` naming the output, not a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quant.errors import CLIError, raise_on_sigterm

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Tests only: seconds to sleep once the output is complete, before it is published (to signal a
# run "during export" deterministically). The real export path runs either way.
PAUSE_ENV = "VLLM_PLUGINS_EXPORT_PAUSE_S"
_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_taken(out: Path) -> bool:
    """``out`` exists and is not an empty directory (an empty one is taken over, as by ``mkdir -p``)."""
    out = Path(out)
    return out.exists() and not (out.is_dir() and not out.is_symlink() and not any(out.iterdir()))


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or ``None`` when another
    process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the staging folders of killed runs next to ``out``; returns those removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-")
    for path in sorted(out.parent.iterdir()):
        if not pattern.match(path.name) or not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:  # a live run is writing it
            continue
        try:
            shutil.rmtree(path)
        except OSError as exc:
            print(f"warning: cannot remove {path}, the partial output of an interrupted run: {exc.strerror}",
                  file=sys.stderr)
        else:
            removed.append(path)
            print(f"removed {path}: the partial output of an interrupted run", file=sys.stderr)
        finally:
            os.close(fd)
    return removed


def is_out_of_space(exc: BaseException) -> bool:
    """An ``OSError`` of a full disk or quota, or safetensors' wrapping of one."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    if type(exc).__name__ != "SafetensorError":
        return False
    # Rust's io::Error, as Display ("... (os error 28)") or Debug ("Os { code: 28, ... }").
    codes = re.findall(r"os error (\d+)|code: (\d+)", str(exc))
    return any(int(a or b) in NO_SPACE_ERRNOS for a, b in codes)


@contextmanager
def _signals_blocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
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


@contextmanager
def staged_output_dir(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it onto ``out`` on success.

    An existing empty ``out`` is taken over. A non-empty one is replaced when
    ``replace`` is set (swapped out, then deleted) and is otherwise a
    :class:`FileExistsError`, raised after the temporary directory is removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    with raise_on_sigterm():
        with _signals_blocked():  # a signal now would leave the folder behind, unlocked
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
            lock = _try_lock(tmp)
            os.chmod(tmp, 0o777 & ~current_umask())
        try:
            try:
                yield tmp
            except Exception as exc:
                if is_out_of_space(exc):
                    raise CLIError(f"{out}: no space left while writing it ({exc}); nothing was written") from None
                raise
            pause = float(os.environ.get(PAUSE_ENV) or 0)
            if pause > 0:
                print(f"export complete in {tmp}, publishing in {pause:g} s", file=sys.stderr, flush=True)
                time.sleep(pause)
            with _signals_blocked():
                _publish(tmp, out, replace)
        finally:
            with _signals_blocked():
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                if lock is not None:
                    os.close(lock)
