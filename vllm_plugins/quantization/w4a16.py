"""W4A16 linear method: symmetric int4 weights in groups, float activations.

Parameters use vLLM's parameter classes, so the stock weight loaders shard
them for column, row and fused (qkv / gate_up) layers under tensor
parallelism. The GEMM comes from vLLM's ``choose_mp_linear_kernel`` (Marlin
or Machete on CUDA; on CPU :mod:`.cpu_int4`, else ``CPUWNA16``); shapes no
kernel takes run the torch reference in :mod:`.packing`.

act_order checkpoints carry ``g_idx``. vLLM 0.32's kernels take no ``g_idx``,
so after loading the input columns are sorted by group (weights repacked
once) and the activations are gathered with the same permutation per call.
"""

from __future__ import annotations

import math

import torch

from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)
from vllm.scalar_type import scalar_types

from vllm_plugins.quantization import packing
from vllm_plugins.quantization.method_base import KernelLinearMethod
from vllm_plugins.quantization.schema import LayerScheme

logger = init_logger("vllm.plugins.vllm_plugins.w4a16")

WEIGHT_TYPE = scalar_types.uint4b8  # stored q + 8, as in GPTQ and compressed-tensors


class SharedGIdxParameter(RowvLLMParameter):
    """``g_idx`` of a fused layer: every shard must bring the same one."""

    def _load_shared(self, loaded_weight: torch.Tensor) -> None:
        if getattr(self, "_loaded_once", False):
            if not torch.equal(self.data, loaded_weight.to(self.data.dtype)):
                raise ValueError("the modules fused into one vLLM layer have different g_idx "
                                 "(act_order permutations); such a checkpoint cannot be served fused")
            return
        self._assert_and_load(loaded_weight)
        self._loaded_once = True

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight)


def _sorted_groups(g_idx: torch.Tensor, group_size: int):
    """For act_order: ``(perm, group_of_block)`` if sorting the inputs by group leaves
    whole groups of ``group_size`` contiguous, else None."""
    k = g_idx.numel()
    if group_size <= 0 or k % group_size:
        return None
    perm = torch.argsort(g_idx.to(torch.long), stable=True)
    blocks = g_idx.to(torch.long)[perm].view(-1, group_size)
    if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
        return None
    return perm, blocks[:, 0]


@register_weight_loader_v2_supported_method
class W4A16LinearMethod(KernelLinearMethod):
    scheme: LayerScheme

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs) -> None:
        loader = extra_weight_attrs["weight_loader"]
        in_p, out_p = input_size_per_partition, sum(output_partition_sizes)
        gs, act_order = self.scheme.group_size, self.scheme.act_order and self.scheme.group_size != -1
        row_parallel = input_size != in_p
        layer.input_size_per_partition, layer.output_size_per_partition = in_p, out_p
        layer.logical_widths = output_partition_sizes
        layer.w4_group_size, layer.w4_act_order = gs, act_order
        layer.w4_cpu_activations = self.quant_config.native.cpu_activations  # read by the CPU tile kernel

        if row_parallel and in_p % 8:
            raise ValueError(f"{self.prefix}: input partition {in_p} is not a multiple of 8 int4 values")
        if row_parallel and gs != -1 and not act_order and in_p % gs:
            raise ValueError(f"{self.prefix}: group size {gs} does not divide input partition {in_p}; "
                             "use a smaller tensor-parallel size")

        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(out_p, math.ceil(in_p / 8), dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=loader))
        if gs == -1:
            scales = ChannelQuantScaleParameter(
                data=torch.empty(out_p, 1, dtype=params_dtype), output_dim=0, weight_loader=loader)
        elif act_order:  # groups are scattered over the inputs: every rank keeps them all
            scales = ChannelQuantScaleParameter(
                data=torch.empty(out_p, math.ceil(input_size / gs), dtype=params_dtype),
                output_dim=0, weight_loader=loader)
        else:
            scales = GroupQuantScaleParameter(
                data=torch.empty(out_p, math.ceil(in_p / gs), dtype=params_dtype),
                output_dim=0, input_dim=1, weight_loader=loader)
        layer.register_parameter("scales", scales)
        if self.scheme.act_order:
            layer.register_parameter("g_idx", SharedGIdxParameter(
                data=torch.full((in_p,), -1, dtype=torch.int32), input_dim=0, weight_loader=loader))

        config = MPLinearLayerConfig(
            full_weight_shape=(input_size, output_size), partition_weight_shape=(in_p, out_p),
            weight_type=WEIGHT_TYPE, act_type=params_dtype, group_size=gs, zero_points=False)
        self.fallback_reason = self._choose_kernel(config, in_p)
        if self.fallback_reason is not None:
            self.quant_config.note_fallback(self.prefix, self.fallback_reason)

    def _choose_kernel(self, config: MPLinearLayerConfig, in_p: int) -> str | None:
        if in_p % 8:
            return f"input size {in_p} is not a multiple of 8"
        if self.scheme.group_size != -1 and in_p % self.scheme.group_size:
            return f"group size {self.scheme.group_size} does not divide input size {in_p}"
        try:
            kernel_type = choose_mp_linear_kernel(config)
        except ValueError as exc:
            return " ".join(str(exc).split())  # whole: the reason of every kernel, never cut mid-word
        if kernel_type.__name__ in ("CPUWNA16LinearKernel", "TorchInt4CPULinearKernel"):
            # On CPU this method prefers the plugin's int4 kernels: they decode
            # faster than CPUWNA16 at batch 1 and 16 (scripts/bench_decode.py),
            # and CPUWNA16 is picked without checking that its op exists in this
            # build or takes this activation dtype (it has no float32 path).
            # VLLM_DISABLED_KERNELS=TileInt4CPULinearKernel,TorchInt4CPULinearKernel
            # restores vLLM's choice.
            from vllm_plugins.quantization.cpu_int4 import CPU_INT4_KERNELS, cpu_wna16_problem

            reasons = {k.__name__: k.supports(config) for k in CPU_INT4_KERNELS}
            usable = [k for k in CPU_INT4_KERNELS if reasons[k.__name__][0]]
            problem = cpu_wna16_problem(config.act_type)
            if usable:
                kernel_type = usable[0]
            elif problem is not None:
                return f"CPUWNA16LinearKernel: {problem}; " + "; ".join(
                    f"{name}: {why}" for name, (_, why) in reasons.items())
        self.kernel = kernel_type(config, w_q_param_name="qweight", w_s_param_name="scales")
        return None

    def process_weights_after_loading(self, layer) -> None:
        if self.scheme.act_order and int(layer.g_idx.data.min()) < 0:
            raise ValueError(f"{self.prefix}: act_order is set but the checkpoint has no g_idx for it")
        if layer.w4_act_order and self.kernel is not None:
            self._sort_act_order(layer)
        if self.kernel is not None:
            self.kernel.process_weights_after_loading(layer)

    def _sort_act_order(self, layer) -> None:
        """Permute inputs so each group is contiguous; fall back when groups are not whole."""
        g_idx, gs = layer.g_idx.data, layer.w4_group_size
        found = _sorted_groups(g_idx, gs)
        if found is None:
            self.kernel = None
            self.fallback_reason = "act_order groups are not contiguous blocks on this partition"
            self.quant_config.note_fallback(self.prefix, self.fallback_reason)
            return
        perm, block_group = found
        k = g_idx.numel()
        u = packing.unpack_uint4(layer.qweight.data, k)[:, perm]
        layer.qweight.data = packing.pack_int4(u - 8)
        scales = layer.scales.data[:, block_group.to(layer.scales.device)].contiguous()
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=scales, output_dim=0, input_dim=1, weight_loader=layer.scales.weight_loader))
        layer.register_buffer("w4_perm", perm.to(torch.long), persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is None:
            g_idx = layer.g_idx.data if layer.w4_act_order else None
            return packing.w4a16_reference(x, layer.qweight.data, layer.scales.data,
                                           layer.input_size_per_partition, layer.w4_group_size, g_idx, bias)
        perm = getattr(layer, "w4_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        return self.kernel.apply_weights(layer, x, bias)

