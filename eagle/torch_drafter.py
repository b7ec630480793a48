"""The EAGLE-3 drafter in plain PyTorch, for training and as a reference.

Same math as vLLM's ``Eagle3LlamaForCausalLM`` (one decoder layer whose
attention reads ``[input_layernorm(embeds), hidden_norm(hidden)]``, the
pre-norm residual stream fed back as the next step's hidden state) plus this
package's optional ``embed_norm`` / ``fused_norm``. Tensor names are the
EAGLE authors' (``midlayer.*``), so ``state_dict()`` is a canonical drafter
state for :mod:`eagle.layouts`.

:meth:`ttt_forward` is the training-time-test unroll: step ``i`` feeds the
draft's own hidden states back, with positions advanced by ``i`` as vLLM's
proposer does, and attends to the step-0 keys causally plus its own earlier
steps' keys at the same index (what the KV cache holds at inference).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
         mrope_section: list[int] | None = None) -> torch.Tensor:
    """Neox-style rotary embedding; ``x`` is ``[B, T, heads, dim]``.

    ``positions`` is ``[B, T]``, or ``[3, B, T]`` for M-RoPE (Qwen2-VL):
    frequency band ``j`` then turns by the temporal, height or width row by
    the section of ``mrope_section`` it falls in, as vLLM's
    ``MRotaryEmbedding`` does."""
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    if positions.dim() == 3:
        if mrope_section is None or 2 * sum(mrope_section) != dim:
            raise ValueError(f"M-RoPE positions need mrope_section summing to {dim // 2}, "
                             f"got {mrope_section}")
        row = torch.repeat_interleave(torch.arange(3, device=x.device),
                                      torch.tensor(mrope_section, device=x.device))
        ang = positions.float()[row].permute(1, 2, 0) * inv  # [B, T, dim/2]
    else:
        ang = positions.float()[..., None] * inv  # [B, T, dim/2]
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2 = x[..., : dim // 2].float(), x[..., dim // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, theta: float,
                 mrope_section: list[int] | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
        self.mrope_section = mrope_section
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q = rope(q, positions, self.theta, self.mrope_section)
        k = rope(k, positions, self.theta, self.mrope_section)
        rep = self.heads // self.kv_heads
        return q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)

    def attend(self, q, keys: list, values: list) -> torch.Tensor:
        """``keys[0]``/``values[0]``: step-0, causal; later ones: diagonal."""
        b, t, h, d = q.shape
        scale = d ** -0.5
        s0 = torch.einsum("bqhd,bkhd->bhqk", q, keys[0]) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [torch.einsum("bqhd,bqhd->bhq", q, k)[..., None] * scale for k in keys[1:]]
        p = torch.softmax(torch.cat([s0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", p[..., :t], values[0])
        for j, v in enumerate(values[1:]):
            out = out + p[..., t + j].permute(0, 2, 1)[..., None] * v
        return self.o_proj(out.reshape(b, t, h * d))


class DraftMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.self_attn = DraftAttention(
            h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg.get("rope_theta", 10000.0),
            (cfg.get("rope_parameters") or {}).get("mrope_section"),
        )
        self.mlp = DraftMLP(h, cfg["intermediate_size"])
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)


class TorchEagle3Drafter(nn.Module):
    """``cfg``: flat drafter config (see :func:`eagle.layouts.read_drafter`)."""

    def __init__(self, cfg: dict, num_aux: int):
        super().__init__()
        self.cfg = dict(cfg)
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        target_h = cfg.get("target_hidden_size") or h
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], h)
        self.embed_tokens.weight.requires_grad_(False)
        self.midlayer = MidLayer(cfg)
        self.fc = nn.Linear(num_aux * target_h, h, bias=False)
        self.norm = RMSNorm(h, eps)
        self.lm_head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        self.embed_norm = RMSNorm(h, eps) if cfg.get("input_embeds_norm") else None
        self.fused_norm = RMSNorm(h, eps) if cfg.get("fused_hidden_norm") else None
        self.register_buffer("d2t", torch.zeros(cfg["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg["vocab_size"], dtype=torch.bool))

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """``aux``: the target's aux hidden states concatenated, ``[B, T, n*H]``."""
        fused = self.fc(aux)
        return self.fused_norm(fused) if self.fused_norm is not None else fused

    def step(self, embeds, hidden, positions, keys: list, values: list):
        """One draft step; appends this step's K/V; returns (logits, prenorm)."""
        layer = self.midlayer
        if self.embed_norm is not None:
            embeds = self.embed_norm(embeds)
        residual = hidden
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        q, k, v = layer.self_attn.qkv(x, positions)
        keys.append(k)
        values.append(v)
        residual = layer.self_attn.attend(q, keys, values) + residual
        residual = layer.mlp(layer.post_attention_layernorm(residual)) + residual
        return self.lm_head(self.norm(residual)), residual

    def ttt_forward(self, embeds_per_step: list, aux: torch.Tensor, positions: torch.Tensor):
        """Unroll ``len(embeds_per_step)`` steps; return the list of logits.

        ``embeds_per_step[i]``: input embeddings of step ``i`` (the tokens
        one further ahead each step); ``positions``: step 0's positions,
        ``[B, T]`` or ``[3, B, T]`` (M-RoPE; every row advances by one).
        """
        hidden = self.fuse(aux)
        keys, values, logits = [], [], []
        for i, embeds in enumerate(embeds_per_step):
            out, hidden = self.step(embeds, hidden, positions + i, keys, values)
            logits.append(out)
        return logits

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft logits scattered into the target vocabulary (-inf elsewhere),
        as vLLM's ``compute_logits`` does."""
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.cfg["vocab_size"]), float("-inf"))
        idx = torch.arange(self.cfg["draft_vocab_size"], device=draft_logits.device) + self.d2t
        full[..., idx] = draft_logits
        return full
