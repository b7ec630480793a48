"""Errors of the quantization toolkit, and the one user-error type every command line shares.

They live here, in the library at the bottom of the dependency graph, so that
``quant``, ``models``, ``eagle`` and ``vllm_plugins`` can all raise them without
``quant`` importing vLLM or ``vllm_plugins``.
"""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


class QuantInputError(ValueError):
    """Bad user input (a file, a flag): one line naming the file or flag at fault."""
