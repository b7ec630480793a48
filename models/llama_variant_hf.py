"""Hugging Face reference implementation of the LLaMA variant.

Built from transformers' own Llama modules; only what the variant's options
change is rewritten (q/k norm and partial RoPE in attention, the rotary
frequencies of the default RoPE). Registered with ``AutoModelForCausalLM``
for ``model_type`` ``llama_variant`` by :func:`vllm_plugins.register`, so
``AutoModelForCausalLM.from_pretrained(dir)`` needs no ``trust_remote_code``.
It is the reference the vLLM class is tested against; it is not fast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from models.llama_variant_config import LlamaVariantConfig, rotary_dim
from models.rope_reference import default_rope, reference_rope_type, rope_init_fn


class LlamaVariantRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding over ``rotary_dim`` dims, for every RoPE type of
    :mod:`models.rope_reference` (transformers' own where it has one)."""

    def __init__(self, config: LlamaVariantConfig):
        nn.Module.__init__(self)
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = reference_rope_type(config)
        inv_freq, self.attention_scaling = self.compute_rope_parameters(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def compute_rope_parameters(self, config) -> tuple[torch.Tensor, float]:
        return rope_init_fn(self.rope_type)(config)

    compute_default_rope_parameters = staticmethod(default_rope)


class LlamaVariantAttention(LlamaAttention):
    """Llama attention plus optional per-head q/k RMSNorm and partial RoPE."""

    def __init__(self, config: LlamaVariantConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.rotary_dim = rotary_dim(config)
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _rope(self, q, k, cos, sin):
        rd = self.rotary_dim
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
        return torch.cat([q_rot, q[..., rd:]], dim=-1), torch.cat([k_rot, k[..., rd:]], dim=-1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)

        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)

        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LlamaVariantDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaVariantConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaVariantAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)  # ACT2FN[hidden_act]: SwiGLU or GeGLU
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaVariantPreTrainedModel(LlamaPreTrainedModel):
    config_class = LlamaVariantConfig
    config: LlamaVariantConfig
    _no_split_modules = ["LlamaVariantDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": LlamaVariantDecoderLayer,
        "attentions": LlamaVariantAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, LlamaVariantRotaryEmbedding):
            inv_freq, _ = module.compute_rope_parameters(module.config)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)
            return
        super()._init_weights(module)


class LlamaVariantModel(LlamaVariantPreTrainedModel):
    def __init__(self, config: LlamaVariantConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaVariantDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaVariantRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = LlamaModel.forward


class LlamaVariantForCausalLM(LlamaVariantPreTrainedModel, GenerationMixin):
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan

    def __init__(self, config: LlamaVariantConfig):
        super().__init__(config)
        self.model = LlamaVariantModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = LlamaForCausalLM.forward


__all__ = ["LlamaVariantForCausalLM", "LlamaVariantModel", "LlamaVariantPreTrainedModel"]
