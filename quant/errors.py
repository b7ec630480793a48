"""Errors of the quantization toolkit."""


class QuantInputError(ValueError):
    """Bad user input (a file, a flag): one line naming the file or flag at fault."""
