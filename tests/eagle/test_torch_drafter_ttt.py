"""Pure-math contracts of training: the TTT unroll equals token-by-token
chain drafting with a KV cache (what vLLM's proposer does), the rotary
embedding equals transformers', the draft vocabulary comes from token
frequencies, and the recorded aux states follow vLLM's layer-id convention."""

from __future__ import annotations

import torch

from eagle.features import default_aux_layer_ids, target_features
from eagle.torch_drafter import TorchEagle3Drafter, rope
from eagle.train import draft_vocab

CFG = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, rms_norm_eps=1e-6, vocab_size=50, draft_vocab_size=20, rope_theta=10000.0)


def _drafter():
    torch.manual_seed(0)
    d = TorchEagle3Drafter(CFG, 3).double().eval()
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return d


def _chain_reference(d, embeds, aux, k, steps):
    """Draft ``steps`` tokens after index ``k`` one at a time, attending to a
    KV cache of step-0 entries 0..k plus the chain's own earlier entries."""
    layer, attn = d.midlayer, d.midlayer.self_attn
    t = aux.shape[1]
    fused = d.fuse(aux)
    x0 = torch.cat([layer.input_layernorm(embeds[:, 1: t + 1]), layer.hidden_norm(fused)], -1)
    _, k0, v0 = attn.qkv(x0, torch.arange(t)[None])
    cache_k, cache_v = [k0[0, j] for j in range(k + 1)], [v0[0, j] for j in range(k + 1)]
    hidden, logits = fused[:, k: k + 1], []
    for i in range(steps):
        x = torch.cat([layer.input_layernorm(embeds[:, k + 1 + i: k + 2 + i]), layer.hidden_norm(hidden)], -1)
        q, kk, vv = attn.qkv(x, torch.tensor([[k + i]]))
        if i:
            cache_k.append(kk[0, 0])
            cache_v.append(vv[0, 0])
        keys, vals = torch.stack(cache_k), torch.stack(cache_v)  # [n, heads, dim]
        scores = torch.einsum("hd,nhd->hn", q[0, 0], keys) / attn.head_dim ** 0.5
        out = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), vals).reshape(1, 1, -1)
        residual = attn.o_proj(out) + hidden
        residual = layer.mlp(layer.post_attention_layernorm(residual)) + residual
        logits.append(d.lm_head(d.norm(residual))[0, 0])
        hidden = residual
    return logits


def test_ttt_unroll_equals_chain_drafting():
    d = _drafter()
    torch.manual_seed(1)
    t, steps = 9, 3
    embeds = torch.randn(1, t + steps, 64, dtype=torch.float64)
    aux = torch.randn(1, t, 3 * 64, dtype=torch.float64)
    with torch.no_grad():
        outs = d.ttt_forward([embeds[:, 1 + i: 1 + i + t] for i in range(steps)], aux, torch.arange(t)[None])
        for k in (0, 3, t - 2):
            ref = _chain_reference(d, embeds, aux, k, steps)
            for i in range(steps):
                torch.testing.assert_close(outs[i][0, k], ref[i], rtol=1e-6, atol=1e-6)  # norms and RoPE run in fp32


def test_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(2)
    x = torch.randn(1, 6, 4, 16, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 7, 30, 31]])
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16)
    cos, sin = LlamaRotaryEmbedding(cfg)(x.float(), pos)
    ref, _ = apply_rotary_pos_emb(x.transpose(1, 2).float(), x.transpose(1, 2).float(), cos, sin)
    torch.testing.assert_close(rope(x, pos, 10000.0).transpose(1, 2).float(), ref, rtol=1e-5, atol=1e-5)


def test_draft_vocab_from_frequencies():
    tokens = torch.tensor([5, 5, 5, 2, 2, 9, 9, 1, 7])
    ids, d2t, t2d = draft_vocab(tokens, vocab_size=10, draft_vocab_size=3)
    assert ids.tolist() == [2, 5, 9]  # most frequent three (ties: lower id), ascending
    assert (torch.arange(3) + d2t).tolist() == ids.tolist()
    assert t2d.nonzero().flatten().tolist() == ids.tolist()


def test_aux_states_follow_vllm_layer_ids(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    feats = target_features(model, ids, (0, 1, 2))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        emb = model.get_input_embeddings()(ids)
        # Id 0: embeddings; id 1: after layer 0; id 2 (= depth): last layer's
        # output before the final norm.
        x = emb
        outs = []
        pos = torch.arange(ids.shape[1])[None]
        rot = model.model.rotary_emb(x, pos)
        for layer in model.model.layers:
            x = layer(x, position_embeddings=rot, position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
            outs.append(x)
    h = 128
    assert torch.equal(feats["embeds"], emb)
    torch.testing.assert_close(feats["aux"][..., :h], emb)
    torch.testing.assert_close(feats["aux"][..., h:2 * h], hs[1])
    torch.testing.assert_close(feats["aux"][..., 2 * h:], outs[-1], rtol=1e-5, atol=1e-5)
    assert default_aux_layer_ids(2) == (0, 1, 2)
    assert default_aux_layer_ids(32) == (2, 16, 29)  # vLLM's default for deep targets
