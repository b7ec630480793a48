"""Imported once per process by :func:`vllm_plugins.register` (``QUANT_MODULES``).

Registers the ``vllm_plugins`` quantization config with vLLM, and the CPU
int4 kernel with vLLM's mixed-precision kernel choice (guarded: only where
PyTorch has the kernel; logged either way).
"""

from vllm_plugins.quantization.config import register_config
from vllm_plugins.quantization.cpu_int4 import register_cpu_int4_kernel

register_config()
register_cpu_int4_kernel()
