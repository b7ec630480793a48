"""``LlamaVariantConfig``: the single source of the LLaMA variant's options.

With every option at its default the variant is exactly LLaMA. The options:

- ``head_dim``: any even size. vLLM runs attention at the smallest head size
  its active backend supports that is at least ``head_dim`` (zero padding,
  exact); the weights keep the true size.
- ``qk_norm``: per-head RMSNorm on q and k before RoPE (weights
  ``self_attn.q_norm.weight`` / ``self_attn.k_norm.weight`` of size head_dim).
- ``partial_rotary_factor``: RoPE rotates only the first
  ``int(head_dim * partial_rotary_factor)`` dims of each head (NeoX halves).
- ``hidden_act``: ``silu`` (SwiGLU) or ``gelu_pytorch_tanh`` (GeGLU).
- ``attention_bias`` (q, k, v and o projections) and ``mlp_bias``.
- ``rope_parameters`` (legacy name ``rope_scaling``): any type that vLLM's
  ``get_rope`` builds for a text model; see :data:`ROPE_TYPES`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from models.dims import head_dim, rope_parameters, rotary_dim

MODEL_TYPE = "llama_variant"
ARCHITECTURE = "LlamaVariantForCausalLM"

# Gated activations: hidden_act -> what multiplies the up projection.
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")

# rope_type values the variant accepts: every type of vLLM's get_rope that
# applies to a decoder over 1-D positions ("dynamic" by "factor" or "alpha",
# "ntk" fixed or with "mixed_b"). Not accepted: the multimodal / M-RoPE types
# (mrope sections, mllama4, bailing_mrope, openpangu), Gemma 4's
# "proportional", Fourier RoPE and dual-chunk attention.
ROPE_TYPES = (
    "default", "linear", "dynamic", "yarn", "longrope", "llama3",
    "ntk", "deepseek_yarn", "deepseek_llama_scaling",
)


@strict(accept_kwargs=True)
class LlamaVariantConfig(LlamaConfig):
    model_type = MODEL_TYPE

    qk_norm: bool = False
    partial_rotary_factor: float = 1.0

    # transformers has no validators for these vLLM RoPE types; checked here.
    def _validate_ntk_rope_parameters(self, rope_parameters, ignore_keys=None):
        _require(rope_parameters, "factor")

    def _validate_deepseek_yarn_rope_parameters(self, rope_parameters, ignore_keys=None):
        _require(rope_parameters, "factor", "original_max_position_embeddings")

    _validate_deepseek_llama_scaling_rope_parameters = _validate_deepseek_yarn_rope_parameters

    def _validate_dynamic_rope_parameters(self, rope_parameters, ignore_keys=None):
        if "alpha" not in rope_parameters:
            super()._validate_dynamic_rope_parameters(rope_parameters, ignore_keys=ignore_keys)

    def validate_architecture(self):
        """Checks the variant's options; the head size need not divide hidden_size."""
        if self.head_dim is None or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"llama_variant: head_dim must be a positive even number, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llama_variant: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"llama_variant: hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        factor = rope_parameters(self).get("partial_rotary_factor", 1.0)
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"llama_variant: partial_rotary_factor must be in (0, 1], got {factor}")
        if rotary_dim(self) % 2:
            raise ValueError(f"llama_variant: head_dim * partial_rotary_factor = {rotary_dim(self)} must be even")
        rope_type = rope_parameters(self).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"llama_variant: rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")


def _require(params: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"llama_variant: rope_type {params.get('rope_type')!r} needs {missing}")


__all__ = ["LlamaVariantConfig", "MODEL_TYPE", "ARCHITECTURE", "HIDDEN_ACTS", "ROPE_TYPES", "rope_parameters", "head_dim", "rotary_dim"]
