"""Formats: one set of drafter weights written in the EAGLE authors',
SpecForge's and speculators' layouts loads into the vLLM drafter class
(through vLLM's own parsing of each config) with identical parameters,
and gives the same draft logits."""

from __future__ import annotations

import pytest
import torch

from eagle.layouts import LAYOUTS, detect_layout, read_drafter, write_drafter
from eagle.torch_drafter import TorchEagle3Drafter


@pytest.fixture(scope="module")
def source(llama_drafter):
    _, cfg, state = read_drafter(llama_drafter)
    return cfg, state


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    cfg, state = source
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_drafter(root / layout, state, cfg, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def loaded(written, llama_target, vllm_drafter):
    return {layout: vllm_drafter(llama_target, path) for layout, path in written.items()}


def test_layout_files_are_the_standard_ones(written, raw_tensors):
    eagle = raw_tensors(written["eagle"])
    spec = raw_tensors(written["speculators"])
    assert (written["eagle"] / "pytorch_model.bin").is_file()
    assert any(k.startswith("midlayer.self_attn.q_proj") for k in eagle)
    assert any(k.startswith("layers.0.self_attn.q_proj") for k in spec)
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(eagle) & set(spec)
    assert "embed_tokens.weight" not in raw_tensors(written["specforge"])
    for layout, path in written.items():
        assert detect_layout(path) == layout


def test_round_trip_is_exact(source, written):
    cfg, state = source
    for layout, path in written.items():
        _, cfg2, state2 = read_drafter(path)
        assert cfg2["draft_vocab_size"] == cfg["draft_vocab_size"]
        assert cfg2["eagle_aux_hidden_state_layer_ids"] == cfg["eagle_aux_hidden_state_layer_ids"]
        expected = {k: v for k, v in state.items() if k != "embed_tokens.weight"}
        assert state2.keys() == expected.keys(), layout
        for k in expected:
            assert torch.equal(state2[k], expected[k]), (layout, k)


def test_vllm_parameters_identical_across_layouts(loaded, source):
    _, state = source
    ref = loaded["specforge"][2]
    for layout, (_, names, params) in loaded.items():
        assert names == set(params), layout
        assert params.keys() == ref.keys()
        for name, p in params.items():
            if "embed_tokens" in name:
                continue  # shared from the target at serving time
            assert torch.equal(p, ref[name]), (layout, name)
    # ...and equal to the source tensors, fused the way vLLM fuses them.
    attn = "model.layers.0.self_attn."
    qkv = torch.cat([state[f"midlayer.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(ref[attn + "qkv_proj.weight"], qkv)
    gate_up = torch.cat([state["midlayer.mlp.gate_proj.weight"], state["midlayer.mlp.up_proj.weight"]])
    assert torch.equal(ref["model.layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(ref["model.fc.weight"], state["fc.weight"])
    d2t = loaded["speculators"][0].draft_id_to_target_id
    assert torch.equal(d2t, state["d2t"])


def test_same_draft_logits_across_layouts(loaded, written, source):
    cfg, _ = source
    torch.manual_seed(0)
    n_aux = len(cfg["eagle_aux_hidden_state_layer_ids"])
    aux = torch.randn(7, n_aux * cfg["hidden_size"])
    hidden = torch.randn(7, cfg["hidden_size"])
    embeds = torch.randn(1, 7, cfg["hidden_size"])
    outputs = {}
    for layout, (model, _, _) in loaded.items():
        with torch.no_grad():
            fused = model.combine_hidden_states(aux)
            vllm_logits = model.compute_logits(hidden)
        _, lcfg, lstate = read_drafter(written[layout])
        ref = TorchEagle3Drafter(lcfg, n_aux).eval()
        ref.load_state_dict(lstate, strict=False)
        with torch.no_grad():
            ttt = ref.ttt_forward([embeds] * 3, aux[None], torch.arange(7)[None])
            torch.testing.assert_close(fused, ref.fuse(aux), rtol=1e-5, atol=1e-5)
            # vLLM's compute_logits == our lm_head scattered through d2t.
            expect = ref.target_logits(ref.lm_head(hidden))
        torch.testing.assert_close(vllm_logits, expect, rtol=1e-5, atol=1e-5)
        assert torch.isinf(vllm_logits).any(), "reduced draft vocabulary must leave -inf columns"
        outputs[layout] = [t.clone() for t in ttt]
    for layout in LAYOUTS:
        for a, b in zip(outputs[layout], outputs["specforge"]):
            assert torch.equal(a, b), layout


@pytest.fixture(scope="module")
def full_vocab_drafter(llama_target, synthetic_text, tmp_path_factory):
    from eagle.train import TrainDrafterConfig, train_drafter

    return train_drafter(TrainDrafterConfig(
        target=llama_target, data=synthetic_text, out=tmp_path_factory.mktemp("full-vocab") / "d",
        steps=2, seq_len=64, batch_size=4, draft_vocab_size=512, self_distill_sequences=0,
        progress=False))


def test_full_vocab_export_loads_in_the_stock_class(full_vocab_drafter, llama_target, vllm_drafter,
                                                    raw_tensors):
    """vLLM's stock ``Eagle3LlamaForCausalLM`` has no ``draft_id_to_target_id``
    when ``draft_vocab_size`` equals the vocabulary: the export must not
    write ``d2t`` (it did, all zeros, and the stock class refused it)."""
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    from eagle.drafter import Eagle3MultimodalLlamaForCausalLM

    _, cfg, state = read_drafter(full_vocab_drafter)
    assert cfg["draft_vocab_size"] == cfg["vocab_size"] == 512
    hidden = torch.randn(3, cfg["hidden_size"])
    for cls in (Eagle3LlamaForCausalLM, Eagle3MultimodalLlamaForCausalLM):
        model, _, params = vllm_drafter(llama_target, full_vocab_drafter, cls=cls)
        assert model.draft_id_to_target_id is None
        assert torch.equal(params["lm_head.weight"][:512], state["lm_head.weight"])
        with torch.no_grad():
            logits = model.compute_logits(hidden)
        # Every target id is a draft candidate: the trained lm_head, no -inf.
        torch.testing.assert_close(logits[:, :512], hidden @ state["lm_head.weight"].t(),
                                   rtol=1e-5, atol=1e-5)
    assert not {"d2t", "t2d"} & set(raw_tensors(full_vocab_drafter))
