"""What the W4A16 and W8A8 linear methods share: the chosen kernel, or the
reason the layer runs the torch reference instead."""

from __future__ import annotations

from vllm.model_executor.layers.linear import LinearMethodBase


class KernelLinearMethod(LinearMethodBase):
    def __init__(self, quant_config, scheme, prefix: str) -> None:
        self.quant_config = quant_config
        self.scheme = scheme  # schema.LayerScheme
        self.prefix = prefix
        self.kernel = None
        self.fallback_reason: str | None = None

    @property
    def kernel_name(self) -> str:
        return type(self.kernel).__name__ if self.kernel is not None else "torch-fallback"
