"""Plain-torch decoder of the Llama family for calibration, without transformers' modeling code.

transformers' ``masking_utils`` imports ``torch._dynamo`` unconditionally (torch >= 2.6)
and every ``modeling_*`` module imports ``masking_utils``; its config classes import
``torch._dynamo`` too (``configuration_llama`` -> ``utils.type_validators`` -> ``activations``
-> ... ``torch.compiler.disable``), and so does ``AutoTokenizer``'s module. Building the
model with transformers costs the quantize process about 190 MiB of resident memory and
seconds of import time for a compiler it never runs. These architectures are rebuilt from
plain torch instead, from ``config.json`` read as JSON:

- ``LlamaForCausalLM``;
- ``LlamaVariantForCausalLM``, this project's variant (:mod:`models.llama_variant_config`):
  any even ``head_dim``, per-head q/k RMSNorm, partial rotary dims, GeGLU, biases.

:meth:`LlamaLayersConfig.from_dict` parses ``config.json`` itself (transformers' config
classes import ``torch._dynamo`` as well) and raises :class:`Unsupported` for whatever the
layers do not build exactly (another architecture, a RoPE type outside :data:`ROPE_TYPES`,
another activation, an invalid value); :mod:`quant.model` then builds the model with
transformers as before, which also reports invalid configs.

The module tree, parameter names and module outputs are transformers' (``model.layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``; the attention returns ``(output, None)``), so
the hooks and replays of :mod:`quant.pipeline` / :mod:`quant.replay` and the exports see the same
modules. The operations run in transformers' order with its SDPA call (``is_causal``
and ``enable_gqa`` without a mask), so layer outputs are bit for bit those of
transformers' layers (``tests/quant/test_llama_layers.py`` compares them in float32 and bfloat16).
The calibration feeds whole windows without padding: there is no attention mask and no KV cache.
Nothing here runs a random initialisation or arithmetic on the ``meta`` device: both go through
torch's Python references, which import ``torch._dynamo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.dims import head_dim, rope_parameters, rotary_dim

# ``architectures`` entry -> (model_type, takes the variant's options: q/k norm, partial rotary dims)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", False), "LlamaVariantForCausalLM": ("llama_variant", True)}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": nn.SiLU, "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}
# transformers' SDPA attention lets SDPA broadcast the KV heads (enable_gqa) up to this head size.
GQA_MAX_HEAD_DIM = 256
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


class Unsupported(ValueError):
    """The config needs transformers' own layers (its message says why)."""


@dataclass(frozen=True)
class LlamaLayersConfig:
    """What the layers need from ``config.json``, with transformers' ``LlamaConfig`` defaults
    (parsed here: transformers' config classes import ``torch._dynamo``)."""

    architectures: tuple[str, ...]
    model_type: str
    variant: bool
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_parameters: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "LlamaLayersConfig":
        """Raises :class:`Unsupported` for anything but a valid config these layers build exactly."""
        if not isinstance(raw, dict):
            raise Unsupported("config.json is not an object")
        archs = raw.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise Unsupported(f"architecture {archs}")
        model_type, variant = ARCHITECTURES[archs[0]]
        if raw.get("model_type") != model_type:
            raise Unsupported(f"model_type {raw.get('model_type')!r} with architecture {archs[0]}")
        d = {f: raw[f] for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings") if f in raw}
        heads = raw.get("num_attention_heads", cls.num_attention_heads)
        hidden = raw.get("hidden_size", cls.hidden_size)
        ints = {**d, "num_attention_heads": heads, "hidden_size": hidden,
                "num_key_value_heads": raw.get("num_key_value_heads") or heads,
                "head_dim": raw.get("head_dim") or (hidden // heads if _positive_int(heads) else None)}
        for name, value in ints.items():
            if not _positive_int(value):
                raise Unsupported(f"{name} {value!r}")
        pad = raw.get("pad_token_id")
        if pad is not None and not (isinstance(pad, int) and 0 <= pad < ints.get("vocab_size", cls.vocab_size)):
            raise Unsupported(f"pad_token_id {pad!r}")
        flags = {f: raw.get(f, False) for f in ("tie_word_embeddings", "attention_bias", "mlp_bias")}
        flags["qk_norm"] = raw.get("qk_norm", False) if variant else False
        if not all(isinstance(v, bool) for v in flags.values()) or (not variant and raw.get("qk_norm")):
            raise Unsupported(f"flags {flags}")
        eps = raw.get("rms_norm_eps", cls.rms_norm_eps)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise Unsupported(f"rms_norm_eps {eps!r}")
        config = cls(
            architectures=tuple(archs), model_type=model_type, variant=variant, **ints, **flags,
            hidden_act=raw.get("hidden_act", "silu"), rms_norm_eps=float(eps), pad_token_id=pad,
            rope_parameters=_rope_parameters(raw, variant, ints.get("max_position_embeddings",
                                                                     cls.max_position_embeddings)))
        config.check()
        return config

    def check(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise Unsupported(f"hidden_act {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise Unsupported("num_attention_heads is not a multiple of num_key_value_heads")
        if not self.variant and self.hidden_size % self.num_attention_heads:
            raise Unsupported("hidden_size is not a multiple of num_attention_heads")
        rope = self.rope_parameters
        if rope["rope_type"] not in ROPE_TYPES:
            raise Unsupported(f"rope_type {rope['rope_type']!r}")
        factor = rope.get("partial_rotary_factor", 1.0)
        if (factor != 1.0 and not self.variant) or not 0 < factor <= 1 or self.head_dim % 2 or rotary_dim(self) % 2:
            raise Unsupported(f"head_dim {self.head_dim} with partial_rotary_factor {factor}")
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")}.get(rope["rope_type"], ())
        for key in ("rope_theta", *needed):
            if isinstance(rope.get(key), bool) or not isinstance(rope.get(key), (int, float)) or not rope[key] > 0:
                raise Unsupported(f"rope_parameters[{key!r}] {rope.get(key)!r}")

    def get_text_config(self) -> "LlamaLayersConfig":
        """As transformers' configs answer it (the pipeline reads ``max_position_embeddings`` from it)."""
        return self


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rope_parameters(raw: dict, variant: bool, max_positions: int) -> dict:
    """``rope_parameters`` as transformers standardizes them (``convert_rope_params_to_dict``):
    the legacy ``rope_scaling`` first, ``rope_theta`` / ``partial_rotary_factor`` filled in from the top level."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise Unsupported("rope parameters per layer type")
    rope = dict(rope)
    rope.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA))
    partial = raw.get("partial_rotary_factor", 1.0 if variant else None)
    if partial is not None:
        rope.setdefault("partial_rotary_factor", partial)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] == "llama3":
        if "original_max_position_embeddings" in raw:
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` of the config's RoPE over :func:`rotary_dim` dims (float32),
    computed as transformers computes them (``modeling_rope_utils``) for ``default``, ``linear`` and ``llama3``."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    dim = rotary_dim(config)
    # On the CPU even while a meta model is built: meta arithmetic runs Python refs that import torch._dynamo.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not one of {ROPE_TYPES}")
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths above ``original / low_freq_factor`` divided by ``factor``, those between
    ``original / high_freq_factor`` and that interpolated smoothly, shorter ones unchanged."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class LlamaRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables of the positions, in the activations' dtype (the frequencies stay float32)."""

    def __init__(self, config: LlamaLayersConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the frequencies (after the module got storage on a device)."""
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.config)[0])

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """NeoX-style RoPE of ``[batch, heads, seq, dim]`` q and k by ``[batch, seq, dim]`` tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class LlamaAttention(nn.Module):
    """Causal grouped-query attention by SDPA, with the variant's q/k norm and partial RoPE."""

    def __init__(self, config: LlamaLayersConfig, dtype: torch.dtype | None = None):
        super().__init__()
        variant = config.variant
        self.head_dim = head_dim(config)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.rotary_dim = rotary_dim(config)
        self.partial = variant  # the variant rotates the first rotary_dim dims and concatenates the rest
        bias = config.attention_bias
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=bias, dtype=dtype)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def _rope(self, q, k, cos, sin):
        if not self.partial:
            return apply_rotary(q, k, cos, sin)
        rd = self.rotary_dim
        q_rot, k_rot = apply_rotary(q[..., :rd], k[..., :rd], cos, sin)
        return torch.cat([q_rot, q[..., rd:]], dim=-1), torch.cat([k_rot, k[..., rd:]], dim=-1)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = self._rope(q, k, *position_embeddings)
        gqa = {}
        if self.num_key_value_groups > 1:
            if k.shape[-1] == v.shape[-1] <= GQA_MAX_HEAD_DIM:
                gqa["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scaling,
                                             is_causal=q.shape[2] > 1, **gqa)
        out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, dim]`` -> ``[batch, kv_heads * n_rep, seq, dim]``, each KV head repeated in place."""
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, dim).reshape(batch, kv_heads * n_rep, seq, dim)


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU, or GeGLU for the variant)."""

    def __init__(self, config: LlamaLayersConfig, dtype: torch.dtype | None = None):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias, dtype=dtype)
        self.act_fn = ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaLayersConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config, dtype)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                use_cache: bool = False) -> torch.Tensor:
        """``use_cache`` is accepted for the pipeline's calls; there is no cache."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, position_embeddings)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaLayersConfig, dtype: torch.dtype | None = None):
        super().__init__()
        # Given storage, not initialised: a random normal_ on the meta device imports torch._dynamo.
        table = torch.empty((config.vocab_size, config.hidden_size), dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, _weight=table)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool = False) -> torch.Tensor:
        """The final hidden states of whole windows (positions 0..seq-1, causal, no padding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=position_embeddings, use_cache=use_cache)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """``model`` + ``lm_head``, named as transformers names them; built on any device (``meta`` for calibration)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaLayersConfig, dtype: torch.dtype | None = None):
        super().__init__()
        config.check()
        self.config = config
        self.model = LlamaModel(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _init_weights(self, module: nn.Module) -> None:
        """Derived buffers of ``module`` (the rotary frequencies), as transformers' models name this step."""
        if isinstance(module, LlamaRotaryEmbedding):
            module.reset_parameters()

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``."""
        return self.lm_head(self.model(input_ids=input_ids, inputs_embeds=inputs_embeds))
