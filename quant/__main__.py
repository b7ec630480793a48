"""``python -m quant ...``: the quantize command without the rest of the package's CLI.

Takes the same flags as ``vllm-plugins quantize`` and runs where vLLM is not
installed (a GPU box used only for quantization).
"""

import sys

from quant.cli import main

sys.exit(main())
