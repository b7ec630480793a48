"""A CPU W8A8 kernel for vLLM's int8 scaled-mm kernel choice.

vLLM's ``CPUInt8ScaledMMLinearKernel`` runs a oneDNN int8 GEMM, which at
batch 1 reads the int8 weights well below the memory bandwidth a bf16 GEMM
reaches here. :class:`GemvInt8CPULinearKernel` extends it with the plugin's
compiled GEMV (:mod:`.cpu_ext`, ``csrc/int8_gemv.cpp``: AVX512-VNNI
``vpdpbusd``, the same per-token quantization and exact int32 sums) for
dynamic symmetric per-token activations; layers whose shape it cannot take
(``N % 4``, ``K % 64``) keep the oneDNN path of the parent class.
:func:`register_cpu_int8_kernel` puts it first in vLLM's CPU int8 list, so
vLLM's in-tree W8A8 methods (compressed-tensors) use it too.
"""

from __future__ import annotations

import torch

from vllm.logger import init_logger
from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import Int8ScaledMMLinearLayerConfig
from vllm.model_executor.layers.quantization.utils import replace_parameter
from vllm.model_executor.layers.quantization.utils.w8a8_utils import convert_to_channelwise

from vllm_plugins.quantization import cpu_ext

logger = init_logger("vllm.plugins.vllm_plugins.cpu_int8")


class GemvInt8CPULinearKernel(CPUInt8ScaledMMLinearKernel):
    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        ok, why = super().is_supported(compute_capability)
        if not ok:
            return ok, why
        if not cpu_ext.load():
            return False, "the CPU GEMM extension did not build or load (see the warning above)"
        if not cpu_ext.int8_has_fast_path():
            return False, "this CPU lacks AVX512-VNNI"
        return True, None

    @classmethod
    def can_implement(cls, c: Int8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        if c.is_static_input_scheme or not c.input_symmetric:
            return False, "dynamic symmetric per-token activations only"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w_q_name, w_s_name, _, _, _ = self.layer_param_names
        weight = getattr(layer, w_q_name)
        self.gemv_problem = cpu_ext.int8_problem(*weight.shape)
        if self.gemv_problem is not None:
            super().process_weights_after_loading(layer)  # oneDNN for this layer
            return
        scales = getattr(layer, w_s_name)
        if not self.config.is_channelwise:
            scales = convert_to_channelwise(scales, layer.logical_widths)
        replace_parameter(layer, w_q_name, torch.nn.Parameter(weight.data.contiguous(), requires_grad=False))
        replace_parameter(layer, w_s_name, torch.nn.Parameter(
            scales.data.to(torch.float32).reshape(-1).contiguous(), requires_grad=False))
        layer.int8_wsum = torch.nn.Parameter(weight.data.sum(dim=1, dtype=torch.int32), requires_grad=False)
        self.linear_method = self._apply_gemv

    def _apply_gemv(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w_q, w_s, _, _, _ = self._get_layer_params(layer)
        return cpu_ext.int8_linear(x, w_q, layer.int8_wsum, w_s, bias)


def register_cpu_int8_kernel() -> str:
    """Put the kernel first in vLLM's CPU int8 scaled-mm candidates (idempotent)."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.platforms import PlatformEnum

    candidates = kernels._POSSIBLE_INT8_KERNELS.setdefault(PlatformEnum.CPU, [])
    if GemvInt8CPULinearKernel in candidates:
        return "already registered"
    candidates.insert(0, GemvInt8CPULinearKernel)
    logger.info("GemvInt8CPULinearKernel registered first in vLLM's CPU int8 kernels "
                "(dynamic per-token activations; AVX512-VNNI, checked when a layer is built)")
    return "registered"
