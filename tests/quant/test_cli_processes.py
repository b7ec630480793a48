"""The command lines as real processes: SIGINT / SIGTERM during an export, ``kill -9`` then a
new run, and a file system that refuses to grow (RLIMIT_FSIZE, as a full disk).

Every export goes through :func:`quant.outdir.staged_output_dir`, so quantize, convert and
train-drafter are each interrupted once. ``cli_process(..., pause_s=...)`` makes the export
wait, complete but unpublished, so the signal lands during the export every time.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quant_helpers import tree_digest

QUANTIZE = ["--num-samples", "4", "--seqlen", "64", "--no-progress", "--method", "rtn"]


def _argv(command: str, source: Path, out: Path, calib: Path) -> list[str]:
    if command == "quantize":
        return ["quant", "quantize", "--model", str(source), "--out", str(out), "--calib", str(calib), *QUANTIZE]
    if command == "convert":
        return ["convert", str(source), str(out)]
    return ["train-drafter", "--target", str(source), "--data", str(calib), "--out", str(out), "--no-progress",
            "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--draft-vocab-size", "256",
            "--self-distill-sequences", "4"]


def _wait_for_export(proc) -> list[str]:
    """stderr lines up to the export's pause (the output complete, not yet published)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("export complete in "):
            return lines
    proc.wait()
    pytest.fail(f"the export never paused (exit {proc.returncode}):\n{''.join(lines)}")


def _no_litter(out: Path) -> None:
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    assert not left, f"staging folders left behind: {left}"
    assert not out.exists()


@pytest.mark.parametrize("command, signum", [("quantize", signal.SIGTERM), ("quantize", signal.SIGINT),
                                             ("convert", signal.SIGTERM), ("train-drafter", signal.SIGINT)],
                         ids=["quantize-SIGTERM", "quantize-SIGINT", "convert-SIGTERM", "train-drafter-SIGINT"])
def test_signal_during_export(cli_process, source, calib, tmp_path, command, signum):
    """Rows 3 and 5: SIGTERM left .OUT.partial-XXXX; SIGINT was a KeyboardInterrupt traceback."""
    if command == "convert":  # convert takes a Llama directory: the tiny Llama is one
        assert '"model_type": "llama"' in (source / "config.json").read_text()
    out = tmp_path / "out"
    before = tree_digest(source)
    proc = cli_process(_argv(command, source, out, calib), pause_s=120)
    head = _wait_for_export(proc)
    assert list(tmp_path.glob(".out.partial-*")), "the export was not staged"
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    err = [line for line in ("".join(head) + rest).splitlines() if line.strip()]
    assert proc.returncode == 128 + signum, err
    assert err[-1].endswith(f"interrupted by {signal.Signals(signum).name}; no partial output was left behind"), err
    assert not any("Traceback" in line for line in err), err
    _no_litter(out)
    assert tree_digest(source) == before


def test_kill_9_then_a_new_run(cli_process, source, calib, tmp_path, capsys):
    """Row 4: the staging folder of a killed run stayed, and no later run removed or mentioned it."""
    from vllm_plugins.cli import main

    out = tmp_path / "out"
    proc = cli_process(_argv("quantize", source, out, calib), pause_s=120)
    _wait_for_export(proc)
    proc.kill()
    proc.communicate(timeout=60)
    stale = list(tmp_path.glob(".out.partial-*"))
    assert len(stale) == 1 and (stale[0] / "config.json").is_file()
    capsys.readouterr()
    assert main(["quantize", "--model", str(source), "--out", str(out), "--calib", str(calib), *QUANTIZE]) == 0
    assert f"removed {stale[0]}: the partial output of an interrupted run" in capsys.readouterr().err
    assert not stale[0].exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_full_disk(cli_process, source, calib, tmp_path, command):
    """Row 2: OSError [Errno 28] / SafetensorError tracebacks, exit 1."""
    out = tmp_path / "out"
    proc = cli_process(_argv(command, source, out, calib), fsize_limit=64 << 10)
    _, stderr = proc.communicate(timeout=300)
    err = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, stderr
    assert len(err) == 1 and f"{out}: no space left while writing it" in err[0], err
    _no_litter(out)


_FORKED_CHILD = r'''
import os, signal, sys, time
from quant.errors import run_command

def command(_args):
    pid = os.fork()
    if pid == 0:  # e.g. a worker of lm-eval's bootstrap pool, terminated by its parent
        time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
    return 0

sys.exit(run_command("t", command, None))
'''


def test_forked_child_dies_of_sigterm_as_by_default():
    """The command's SIGTERM handler is its own process's: a forked child that inherits it dies of
    SIGTERM as it would by default, instead of raising in the child (a traceback in the log)."""
    proc = subprocess.run([sys.executable, "-c", _FORKED_CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr
