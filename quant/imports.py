"""Keep the quantize process's imports to what it uses.

transformers' generation code (imported by every ``modeling_*`` module through
``modeling_utils``) imports ``sklearn.metrics`` whenever scikit-learn is
installed, for assisted generation's ``roc_curve``, and scikit-learn brings
``scipy.stats`` and ``pandas``: about 100 MiB of resident memory and seconds of
import time that a quantization never uses (lm-eval installs scikit-learn).
:func:`unused_modules_hidden` hides such packages from the import system
while the quantize command runs: transformers checks them with
``importlib.util.find_spec``, which answers ``None`` for a ``sys.modules``
entry set to ``None``, so it takes the code path it takes when they are not
installed. Packages already imported are left alone, and the entries are
removed again on exit, so a later ``import sklearn`` in the same process works.

``torch._dynamo`` is kept out differently, without hiding anything: transformers'
``masking_utils`` imports it unconditionally (torch >= 2.6) and every ``modeling_*``
module imports ``masking_utils`` (so do its config classes and ``AutoTokenizer``'s module), so
the Llama family calibrates with the plain-torch layers of :mod:`quant.llama_layers`, built
from ``config.json`` read as JSON, and its tokenizer class is imported directly
(:func:`quant.calib.load_tokenizer`). Other architectures run transformers' layers and
import ``torch._dynamo``.
"""

from __future__ import annotations

import contextlib
import sys

# Imported by transformers for generation features the quantizer never uses.
UNUSED_OPTIONAL_PACKAGES = ("sklearn", "pandas")


@contextlib.contextmanager
def unused_modules_hidden(names: tuple[str, ...] = UNUSED_OPTIONAL_PACKAGES):
    """Inside the block, ``import NAME`` fails and ``find_spec(NAME)`` is ``None`` for ``names`` not yet imported."""
    hidden = [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in hidden:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]
