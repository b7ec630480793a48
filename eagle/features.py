"""Target features for drafter training, from the Hugging Face target.

Follows vLLM's ``SupportsEagle3`` convention: aux layer id ``i`` is the
residual stream entering decoder layer ``i`` (0 = the input embeddings), and
id ``L`` (the depth) is the last layer's output before the final norm. The
input embeddings are recorded as the language model sees them, so for a
vision-language target they hold the image embeddings at placeholder
positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def decoder_stack(model) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """``(layers, final_norm)`` of a causal LM or a LLaVA-style VLM."""
    inner = model.model
    lm = getattr(inner, "language_model", inner)
    return lm.layers, lm.norm


def default_aux_layer_ids(num_layers: int) -> tuple[int, ...]:
    """vLLM's default ``(2, L // 2, L - 3)`` where it gives three distinct
    valid ids; otherwise three ids spread over ``0..L``."""
    ids = (2, num_layers // 2, num_layers - 3)
    if len(set(ids)) == 3 and min(ids) >= 0:
        return ids
    if num_layers < 2:
        raise ValueError(f"a target with {num_layers} layer(s) has fewer than 3 aux states")
    return (0, num_layers // 2, num_layers)


@torch.no_grad()
def target_features(model, input_ids: torch.Tensor, aux_layer_ids: Sequence[int], **model_inputs):
    """Run the target once; return ``embeds`` [B,T,H], ``aux`` [B,T,n*H]
    (in ``aux_layer_ids`` order) and ``logits`` [B,T,V]."""
    layers, norm = decoder_stack(model)
    captured: dict[int, torch.Tensor] = {}

    def grab(idx):
        def hook(_module, args, kwargs):
            captured[idx] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    wanted = set(aux_layer_ids) | {0}
    handles = [
        (layers[i] if i < len(layers) else norm).register_forward_pre_hook(grab(i), with_kwargs=True)
        for i in sorted(wanted)
    ]
    try:
        out = model(input_ids=input_ids, use_cache=False, **model_inputs)
    finally:
        for h in handles:
            h.remove()
    return {
        "embeds": captured[0],
        "aux": torch.cat([captured[i] for i in aux_layer_ids], dim=-1),
        "logits": out.logits.detach(),
    }
