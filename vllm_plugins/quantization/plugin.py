"""Imported once per process by :func:`vllm_plugins.register` (``QUANT_MODULES``).

Registers the ``vllm_plugins`` quantization config with vLLM, and the CPU
int4 kernels with vLLM's mixed-precision kernel choice (logged; guarded: each
kernel declines layers where its op is missing: aten's int4 kernel in this
torch, or the compiled tile GEMV, which also needs AVX512-BF16).
"""

from vllm_plugins.quantization.config import register_config
from vllm_plugins.quantization.cpu_int4 import register_cpu_int4_kernel

register_config()
register_cpu_int4_kernel()
