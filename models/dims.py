"""Readers of a LLaMA-family config's head and RoPE dimensions, without importing transformers.

Shared by the variant's model code (``models/llama_variant*.py``) and quant's
plain-torch calibration layers (``quant/llama_layers.py``), which must not
import transformers' config classes (they import ``torch._dynamo``). ``config``
is any object with the config.json fields as attributes.
"""

from __future__ import annotations


def rope_parameters(config) -> dict:
    """The config's RoPE parameters (transformers 5 keeps partial_rotary_factor there)."""
    return dict(getattr(config, "rope_parameters", None) or {})


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """How many leading dims of each head RoPE rotates."""
    return int(head_dim(config) * rope_parameters(config).get("partial_rotary_factor", 1.0))
