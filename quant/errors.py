"""Errors of the quantization toolkit, and the one user-error type every command line shares.

They live here, in the library at the bottom of the dependency graph, so that
``quant``, ``models``, ``eagle`` and ``vllm_plugins`` can all raise them without
``quant`` importing vLLM or ``vllm_plugins``.
"""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


class QuantInputError(ValueError):
    """Bad user input (a file, a flag): one line naming the file or flag at fault."""


class Interrupted(BaseException):
    """SIGTERM turned into an exception (as Python turns SIGINT into ``KeyboardInterrupt``), so that
    ``finally`` blocks remove partial output. A ``BaseException``: ``except Exception`` lets it pass."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_command(prog: str, func, args) -> int:
    """Run one command-line command: a :class:`CLIError` is one line and exit 2; SIGINT and
    SIGTERM are one line and exit 130 / 143 (128 + the signal), after the staged output
    directories (:mod:`quant.outdir`) have removed themselves."""
    import signal
    import sys

    with raise_on_sigterm():
        try:
            return int(func(args) or 0)
        except CLIError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            name = signal.Signals(signum).name
            print(f"{prog}: interrupted by {name}; no partial output was left behind", file=sys.stderr)
            return 128 + signum


_handler_pid: int | None = None  # the process that installed _raise_interrupted


def _raise_interrupted(signum, _frame):
    import os
    import signal

    if os.getpid() != _handler_pid:
        # A forked child (e.g. lm-eval's bootstrap pool) inherited the handler: die as SIGTERM
        # would have killed it, instead of printing a traceback from the child.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


class raise_on_sigterm:  # noqa: N801 - used as a context manager, like contextlib's
    """While active (main thread only), SIGTERM raises :class:`Interrupted` unless the process
    already had a handler of its own; the previous handler comes back at exit."""

    def __enter__(self):
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            global _handler_pid
            import os

            _handler_pid = os.getpid()
            self._previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
