"""``quant.llama_layers`` against transformers' own Llama and the variant's HF reference.

Layer outputs and logits must be bit for bit those of transformers (float32 and
bfloat16) on the real TinyStories-656K, a random GQA Llama with llama3 and with
linear RoPE scaling, heads wider than SDPA's GQA limit, and the LLaMA variant
(q/k norm, partial rotary dims, GeGLU, biases); then whole quantizations must
export the same integers and scales as the transformers path. Configs the
layers do not cover fall back to transformers' layers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quant import llama_layers
from quant.checkpoint import ShardReader
from quant.config import QuantConfig
from quant.model import DecoderSkeleton
from quant.pipeline import quantize_checkpoint

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SMALL = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=512, initializer_range=0.1, pad_token_id=None)
RANDOM = {  # name -> (variant?, config fields)
    "llama3-gqa": (False, dict(SMALL, rope_parameters=LLAMA3)),
    "linear-mha": (False, dict(SMALL, num_key_value_heads=6,
                               rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "wide-heads": (False, dict(SMALL, num_attention_heads=2, num_key_value_heads=1, head_dim=272)),
    "variant": (True, dict(SMALL, head_dim=24, qk_norm=True, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "variant-llama3-geglu-bias": (True, dict(SMALL, head_dim=32, qk_norm=True, hidden_act="gelu_pytorch_tanh",
                                             attention_bias=True, mlp_bias=True,
                                             rope_parameters={**LLAMA3, "partial_rotary_factor": 0.75})),
}


def _random_model(variant: bool, fields: dict):
    if variant:
        from models.llama_variant_config import ARCHITECTURE, LlamaVariantConfig as config_cls
        from models.llama_variant_hf import LlamaVariantForCausalLM as model_cls
    else:
        from transformers import LlamaConfig as config_cls, LlamaForCausalLM as model_cls
        ARCHITECTURE = "LlamaForCausalLM"
    config = config_cls(**fields)
    config.architectures = [ARCHITECTURE]
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # norms start at 1 and biases at 0: make a wrong norm or a dropped bias visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _config_json(model) -> dict:
    """What ``save_pretrained`` writes to config.json."""
    return json.loads(model.config.to_json_string(use_diff=True))


@pytest.fixture(scope="module")
def references(shared_dir):
    """name -> (a float32 transformers model, its config.json as a dict)."""
    from transformers import AutoModelForCausalLM

    tinystories = shared_dir / "models" / "TinyStories-656K"
    refs = {"tinystories": (AutoModelForCausalLM.from_pretrained(str(tinystories), dtype=torch.float32,
                                                                 attn_implementation="sdpa"),
                            json.loads((tinystories / "config.json").read_text()))}
    for name, spec in RANDOM.items():
        model = _random_model(*spec)
        refs[name] = (model, _config_json(model))
    return refs


def _layer_outputs(model, layers, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    try:
        with torch.no_grad():
            y = model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return outs, getattr(y, "logits", y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["tinystories", *RANDOM])
def test_layers_and_logits_bit_identical_to_transformers(references, name, dtype):
    reference, raw = references[name]
    hf = copy.deepcopy(reference).to(dtype)
    # As transformers builds a model in a dtype (from_config(dtype=...)): the rotary frequencies stay float32.
    hf.model.rotary_emb.inv_freq = reference.model.rotary_emb.inv_freq.clone()
    config = llama_layers.LlamaLayersConfig.from_dict(raw)
    assert config.rope_parameters == hf.config.rope_parameters and config.head_dim == hf.config.head_dim
    ours = llama_layers.LlamaForCausalLM(config, dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same names, every parameter
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    ids = torch.randint(0, hf.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    want, want_logits = _layer_outputs(hf, hf.model.layers, ids)
    got, got_logits = _layer_outputs(ours, ours.model.layers, ids)
    assert len(got) == len(want) == hf.config.num_hidden_layers
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype == dtype
        assert torch.equal(g, w), f"layer {i}: max |diff| {(g.float() - w.float()).abs().max():.3e}"
    assert torch.equal(got_logits, want_logits)


@pytest.mark.parametrize("change, why", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"hidden_act": "relu"}, "relu"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ({"num_key_value_heads": 4}, "multiple"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
])
def test_configs_the_layers_do_not_build_exactly_are_refused(references, change, why):
    with pytest.raises(llama_layers.Unsupported, match=why):
        llama_layers.LlamaLayersConfig.from_dict({**references["llama3-gqa"][1], **change})


def test_legacy_rope_scaling_is_read_as_transformers_reads_it(references):
    from transformers import LlamaConfig

    raw = {k: v for k, v in references["llama3-gqa"][1].items() if k != "rope_parameters"}
    raw.update(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0})
    want = LlamaConfig.from_dict(raw).rope_parameters
    assert llama_layers.LlamaLayersConfig.from_dict(raw).rope_parameters == want


def _save(model, out, dtype):
    from models.tiny import build_tokenizer

    build_tokenizer(out, vocab_size=model.config.vocab_size)
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(references, shared_dir, tmp_path_factory):
    """name -> checkpoint directory: TinyStories-656K (float32) and random ones saved in bfloat16."""
    out = {"tinystories": shared_dir / "models" / "TinyStories-656K"}
    for name in ("llama3-gqa", "variant-llama3-geglu-bias"):
        out[name] = _save(copy.deepcopy(references[name][0]), tmp_path_factory.mktemp(name), torch.bfloat16)
    yarn = dict(RANDOM["llama3-gqa"][1], rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})
    out["yarn"] = _save(_random_model(False, yarn), tmp_path_factory.mktemp("yarn"), torch.float32)
    return out


@pytest.mark.parametrize("name, expect_own", [("tinystories", True), ("llama3-gqa", True),
                                              ("variant-llama3-geglu-bias", True), ("yarn", False)])
def test_skeleton_picks_the_plain_torch_layers_where_they_apply(checkpoints, name, expect_own):
    reader = ShardReader(checkpoints[name])
    assert DecoderSkeleton(checkpoints[name], reader).uses_transformers_layers is not expect_own
    assert DecoderSkeleton(checkpoints[name], reader, transformers_layers=True).uses_transformers_layers


EXPORTS = {  # name -> (checkpoint, config): TinyStories as the issue asks, then bfloat16 calibrations
    "tinystories-w4a16": ("tinystories", QuantConfig(scheme="w4a16", group_size=64)),
    "tinystories-w8a8": ("tinystories", QuantConfig(scheme="w8a8")),
    "tinystories-w8a8-1pass-smoothquant": ("tinystories", QuantConfig(scheme="w8a8", smoothquant=0.5,
                                                                      true_sequential=False)),
    "llama3-gqa-bf16-w4a16": ("llama3-gqa", QuantConfig(scheme="w4a16", group_size=32)),
    "variant-bf16-w8a8": ("variant-llama3-geglu-bias", QuantConfig(scheme="w8a8")),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_exports_identical_to_the_transformers_path(checkpoints, name, tmp_path, assert_same_export):
    model, cfg = EXPORTS[name]
    cfg = cfg.replace(num_samples=16, seqlen=128, format="compressed-tensors")
    vocab = json.loads((checkpoints[model] / "config.json").read_text())["vocab_size"]
    samples = torch.randint(0, vocab, (16, 128), generator=torch.Generator().manual_seed(2))
    for layers in ("own", "transformers"):
        quantize_checkpoint(checkpoints[model], tmp_path / layers, cfg, samples=samples, progress=False,
                            transformers_layers=layers == "transformers")
    assert_same_export(tmp_path / "own", tmp_path / "transformers")


@pytest.mark.parametrize("name", ["tinystories", "llama3-gqa", "variant-llama3-geglu-bias"])
def test_tokenizer_loaded_without_auto_tokenizer_is_auto_tokenizers(checkpoints, shared_dir, name):
    """quant.calib loads a Llama-family tokenizer by the class tokenizer_config.json names (AutoTokenizer's
    module imports transformers' model code): the same class and the same token ids as AutoTokenizer."""
    from transformers import AutoTokenizer

    from quant.calib import _direct_tokenizer_class, load_tokenizer

    assert _direct_tokenizer_class(checkpoints[name]) is not None
    ours, auto = load_tokenizer(checkpoints[name]), AutoTokenizer.from_pretrained(str(checkpoints[name]))
    assert type(ours) is type(auto)
    text = (shared_dir / "data" / "tinystories_val.txt").read_text()[:20000]
    assert ours(text, add_special_tokens=False)["input_ids"] == auto(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_id == auto.eos_token_id
