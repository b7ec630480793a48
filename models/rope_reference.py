"""RoPE frequencies for the HF reference model, one function per ``rope_type``.

transformers' ``ROPE_INIT_FUNCTIONS`` cover ``linear``, ``dynamic`` (by
factor), ``yarn``, ``longrope`` and ``llama3``. vLLM's ``get_rope`` also
builds, for 1-D positions, ``ntk`` (fixed, or mixed with ``mixed_b``),
``dynamic`` by ``alpha`` and ``deepseek_yarn``; their frequencies are
written here from the published formulas (NTK-aware scaling,
https://kexue.fm/archives/9706; YaRN, arXiv:2309.00071, with DeepSeek's
``mscale`` / ``mscale_all_dim`` attention factor). Each function returns
``(inv_freq, attention_scaling)`` like transformers' own.
"""

from __future__ import annotations

import math

import torch

from models.llama_variant_config import rope_parameters, rotary_dim


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def default_rope(config, **kwargs):
    """Plain RoPE over ``rotary_dim`` dims (transformers' default ignores partial rotary)."""
    return _base_inv_freq(rope_parameters(config)["rope_theta"], rotary_dim(config)), 1.0


def ntk_rope(config, **kwargs):
    """Fixed NTK-aware scaling: base * factor, then every frequency / factor^(2/d);
    mixed (``mixed_b``): frequency i divided by exp(a * (i + 1)^b), a = ln(factor) / (d/2)^b."""
    params = rope_parameters(config)
    dim, factor, mixed_b = rotary_dim(config), float(params["factor"]), params.get("mixed_b")
    if mixed_b is None:
        inv_freq = _base_inv_freq(params["rope_theta"] * factor, dim) / factor ** (2.0 / dim)
    else:
        a = math.log(factor) / (dim / 2) ** mixed_b
        lam = torch.exp(a * torch.arange(1, dim // 2 + 1, dtype=torch.float) ** mixed_b)
        inv_freq = _base_inv_freq(params["rope_theta"], dim) / lam
    return inv_freq, 1.0


def dynamic_alpha_rope(config, **kwargs):
    """NTK by ``alpha``: base * alpha^(d / (d - 2)), static."""
    params = rope_parameters(config)
    dim = rotary_dim(config)
    return _base_inv_freq(params["rope_theta"] * float(params["alpha"]) ** (dim / (dim - 2)), dim), 1.0


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_yarn_rope(config, **kwargs):
    """YaRN interpolation between extrapolated and scaled frequencies over a linear
    ramp set by ``beta_fast`` / ``beta_slow``; cos/sin scaled by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    params = rope_parameters(config)
    dim, base, factor = rotary_dim(config), float(params["rope_theta"]), float(params["factor"])
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast", 32), params.get("beta_slow", 1)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where frequencies stay unscaled
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    scaling = _yarn_mscale(factor, float(params.get("mscale", 1))) / _yarn_mscale(
        factor, float(params.get("mscale_all_dim", 0))
    )
    return inv_freq, scaling


# Internal type names (``dynamic`` with ``alpha`` is its own kind) -> function;
# the others come from transformers' ROPE_INIT_FUNCTIONS.
OWN_ROPE_FUNCTIONS = {
    "default": default_rope,
    "ntk": ntk_rope,
    "dynamic_alpha": dynamic_alpha_rope,
    "deepseek_yarn": deepseek_yarn_rope,
}


def reference_rope_type(config) -> str:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic" and "alpha" in params:
        return "dynamic_alpha"
    if rope_type == "deepseek_llama_scaling":
        return "deepseek_yarn"
    return rope_type


def rope_init_fn(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return OWN_ROPE_FUNCTIONS.get(rope_type) or ROPE_INIT_FUNCTIONS[rope_type]
