"""``staged_output_dir``: the output appears whole or not at all."""

from __future__ import annotations

import pytest

from quant.outdir import staged_output_dir


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "ckpt"
    with staged_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert _siblings(out) == ["ckpt"]


def test_error_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_untouched(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(FileExistsError, match="ckpt"):
        with staged_output_dir(out) as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert _siblings(out) == ["ckpt"]


def test_replace_and_empty_takeover(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    with staged_output_dir(out, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in empty.iterdir()] == ["a"]
    assert _siblings(out) == ["ckpt", "empty"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_output_mode_follows_umask(tmp_path, umask):
    """Row 13: mkdtemp's 0700 was published as the output's mode."""
    import os
    import stat

    old = os.umask(umask)
    try:
        with staged_output_dir(tmp_path / "ckpt") as tmp:
            (tmp / "config.json").write_text("{}")
        mkdir_made = tmp_path / "by-mkdir"
        mkdir_made.mkdir()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "ckpt").stat().st_mode)
    assert mode == stat.S_IMODE(mkdir_made.stat().st_mode) == 0o777 & ~umask


def test_stale_partial_of_a_killed_run_is_removed(tmp_path, capsys):
    """Row 4: a staging folder nobody holds (its run was killed) is removed, and named."""
    stale = tmp_path / ".ckpt.partial-k1ll3d"
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    old_swap = tmp_path / ".ckpt.old-x"
    old_swap.mkdir()
    other = tmp_path / ".other.partial-abc"  # another output's: not ours to touch
    other.mkdir()
    with staged_output_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a").write_text("a")
    err = capsys.readouterr().err
    assert f"removed {stale}: the partial output of an interrupted run" in err
    assert not stale.exists() and not old_swap.exists() and other.exists()


def test_partial_of_a_live_run_is_kept(tmp_path):
    """A staging folder whose writer is alive (it holds the folder's flock) stays."""
    import fcntl
    import os

    live = tmp_path / ".ckpt.partial-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with staged_output_dir(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_text("a")
        assert live.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("error", ["enospc", "safetensors"])
def test_out_of_space_is_one_error(tmp_path, error):
    """Row 2: OSError [Errno 28] / SafetensorError tracebacks."""
    import errno

    from quant.errors import CLIError

    class SafetensorError(Exception):  # what safetensors raises, by name, with Rust's io error in it
        pass

    exc = (OSError(errno.ENOSPC, "No space left on device") if error == "enospc" else
           SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)'))
    with pytest.raises(CLIError, match=r"ckpt: no space left while writing it .*nothing was written"):
        with staged_output_dir(tmp_path / "ckpt") as tmp:
            (tmp / "a").write_text("a")
            raise exc
    assert list(tmp_path.iterdir()) == []
