"""HF-side references and comparisons for the model tests.

The HF helpers run the transformers model in float32 (eager attention) on the
same token ids that the vLLM jobs get.
"""

from __future__ import annotations


def load_hf(model_dir, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    import vllm_plugins

    vllm_plugins.register()  # AutoConfig / AutoModelForCausalLM know llama_variant
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (no EOS stop)."""
    import torch

    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(
                x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                attention_mask=torch.ones_like(x), pad_token_id=0,
            )
            outs.append(y[0, len(ids):].tolist())
    return outs


def hf_logprobs(model, ids: list[int]):
    """``[len(ids), vocab]`` float64 log-softmax of the logits at each position."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def job_outputs(result: dict) -> list[dict]:
    assert "error" not in result, f"{result['error']}\n{result.get('log', '')[-4000:]}"
    return result["outputs"]
