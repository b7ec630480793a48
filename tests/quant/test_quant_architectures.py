"""Generic decoder-layer discovery: the LLaMA variant and Qwen2/Qwen3-style decoders, with no per-model code.

Each random model is quantized (W8A8 GPTQ, native) and its torch dequantized
model (weights only) must reproduce the float logits closely; every linear of
every layer must be quantized and biases (Qwen2) kept.
"""

from __future__ import annotations

import json

import pytest
import torch

from quant.checkpoint import ShardReader
from quant.config import QuantConfig
from quant.evaluate import load_dequantized_model, load_float_model
from quant.pipeline import quantize_checkpoint

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256)


def _build_qwen(out, kind: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from models.tiny import build_tokenizer

    build_tokenizer(out, vocab_size=512)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, initializer_range=0.1, tie_word_embeddings=False,
                                 bos_token_id=1, eos_token_id=2))
    with torch.no_grad():  # visible biases (Qwen2 has q/k/v biases)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    return {
        "llama_variant": tiny_llama(model_type="llama_variant", qk_norm=True, partial_rotary_factor=0.5),
        "qwen2": _build_qwen(tmp_path_factory.mktemp("qwen2"), "qwen2"),
        "qwen3": _build_qwen(tmp_path_factory.mktemp("qwen3"), "qwen3"),
    }


@pytest.mark.parametrize("kind", ["llama_variant", "qwen2", "qwen3", "llama_variant-gptaq", "qwen2-gptaq"])
def test_quantized_model_tracks_float_logits(models, kind, tmp_path, shared_dir):
    kind, _, method = kind.partition("-")  # "-gptaq": with GPTAQ's float stream (q/k norms, partial RoPE, biases)
    src = models[kind]
    out = tmp_path / "native"
    cfg = QuantConfig(scheme="w8a8", num_samples=8, seqlen=64, gptaq=method == "gptaq")
    report = quantize_checkpoint(src, out, cfg, shared_dir / "data" / "tinystories_val.txt", progress=False)
    assert len(report.layers) == 2 and all(len(s.errors) == 7 for s in report.layers)
    reader = ShardReader(out)
    assert sum(n.endswith(".qweight") for n in reader.names()) == 14
    source_biases = {n for n in ShardReader(src).names() if n.endswith(".bias")}
    assert source_biases <= set(reader.names())
    if kind == "qwen2":
        assert source_biases
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "vllm_plugins"

    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_float_model(src)(input_ids=ids).logits
        got = load_dequantized_model(out)(input_ids=ids).logits
    rel = float((got - ref).norm() / ref.norm())
    print(f"{kind}: relative logit error {rel:.4f}")
    # Random weights with initializer_range 0.2 amplify any int8 rounding (RTN: ~3%); a wrong
    # layer input, mask or lost bias gives errors of order 1.
    assert rel < 0.15, rel
