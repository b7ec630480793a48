"""W8A8 linear method: int8 per-channel weights, dynamic per-token int8 activations.

The GEMM comes from vLLM's scaled-mm kernel choice for int8 (CUTLASS on
CUDA, oneDNN on CPU), configured channel-wise, dynamic and symmetric; if no
kernel takes the layer, the torch reference in :mod:`.packing` runs it.
"""

from __future__ import annotations

import torch

from vllm.model_executor.kernels.linear import (
    _POSSIBLE_INT8_KERNELS,
    Int8ScaledMMLinearLayerConfig,
    choose_scaled_mm_linear_kernel,
)
from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter

from vllm_plugins.quantization import packing
from vllm_plugins.quantization.method_base import KernelLinearMethod

# The kernels look layer parameters up by these names, in this order.
PARAM_NAMES = ["qweight", "scales", "input_scale", "input_zero_point", "azp_adj"]


@register_weight_loader_v2_supported_method
class W8A8LinearMethod(KernelLinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs) -> None:
        loader = extra_weight_attrs["weight_loader"]
        out_p = sum(output_partition_sizes)
        layer.input_size_per_partition, layer.output_size_per_partition = input_size_per_partition, out_p
        layer.logical_widths = output_partition_sizes
        layer.register_parameter("qweight", ModelWeightParameter(
            data=torch.empty(out_p, input_size_per_partition, dtype=torch.int8),
            input_dim=1, output_dim=0, weight_loader=loader))
        layer.register_parameter("scales", ChannelQuantScaleParameter(
            data=torch.empty(out_p, 1, dtype=torch.float32), output_dim=0, weight_loader=loader))
        for name in PARAM_NAMES[2:]:  # dynamic, symmetric: no static input scale / zero point
            layer.register_parameter(name, None)

        config = Int8ScaledMMLinearLayerConfig(
            is_channelwise=True, is_static_input_scheme=False, input_symmetric=True)
        try:
            kernel_type = choose_scaled_mm_linear_kernel(config, _POSSIBLE_INT8_KERNELS, quantization="int8_w8a8")
        except ValueError as exc:
            self.fallback_reason = " ".join(str(exc).split())  # whole, never cut mid-word
            self.quant_config.note_fallback(self.prefix, self.fallback_reason)
            return
        self.kernel = kernel_type(config, layer_param_names=PARAM_NAMES)

    def process_weights_after_loading(self, layer) -> None:
        if self.kernel is not None:
            self.kernel.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is None:
            return packing.w8a8_reference(x, layer.qweight.data, layer.scales.data, bias)
        return self.kernel.apply_weights(layer, x, bias)
