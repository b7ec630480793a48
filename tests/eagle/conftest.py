"""Fixtures of the EAGLE tests: tiny targets and drafters trained for them,
built once per session (training is short; quality does not matter for
losslessness or formats, only for the acceptance test)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama_target(tiny_llama) -> Path:
    """Stock Llama with head size 32, which vLLM's CPU attention serves."""
    return tiny_llama(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def synthetic_text(tmp_path_factory) -> Path:
    from models.tiny import synthetic_corpus

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(synthetic_corpus()))
    return path


def _train(target: Path, data: Path, out: Path, **overrides) -> Path:
    from eagle.train import TrainDrafterConfig, train_drafter

    settings = dict(steps=8, seq_len=64, batch_size=4, draft_vocab_size=256,
                    self_distill_sequences=8, progress=False)
    settings.update(overrides)
    return train_drafter(TrainDrafterConfig(target=target, data=data, out=out, **settings))


@pytest.fixture(scope="session")
def llama_drafter(llama_target, synthetic_text, tmp_path_factory) -> Path:
    return _train(llama_target, synthetic_text, tmp_path_factory.mktemp("llama-draft") / "d")


@pytest.fixture(scope="session")
def vlm_target(tmp_path_factory) -> Path:
    from models.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="session")
def vlm_drafter(vlm_target, synthetic_text, tmp_path_factory) -> Path:
    return _train(vlm_target, synthetic_text, tmp_path_factory.mktemp("vlm-draft") / "d")


@pytest.fixture(scope="session")
def vllm_drafter(vllm_single_process):
    """``vllm_drafter(target_dir, draft_dir, cls=None, weights=None)``: build the
    vLLM drafter class in this process (no engine, no attention forward),
    with vLLM's own config parsing of both checkpoints, and load
    ``weights`` (default: the draft checkpoint's raw tensors). Returns
    ``(model, loaded_names, parameters_as_loaded)``."""
    import torch
    from vllm.config import (
        DeviceConfig, ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig,
        set_current_vllm_config,
    )
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from eagle.drafter import Eagle3MultimodalLlamaForCausalLM

    def build(target: Path, draft: Path, cls=None, weights=None):
        model_config = ModelConfig(model=str(target), dtype="float32", enforce_eager=True,
                                   max_model_len=256)
        parallel = ParallelConfig()
        spec = SpeculativeConfig(model=str(draft), method="eagle3", num_speculative_tokens=3,
                                 target_model_config=model_config, target_parallel_config=parallel)
        config = VllmConfig(model_config=model_config, parallel_config=parallel,
                            speculative_config=spec, device_config=DeviceConfig("cpu"))
        with set_current_vllm_config(config):
            model = (cls or Eagle3MultimodalLlamaForCausalLM)(vllm_config=config)
            if weights is None:
                weights = _raw_tensors(draft)
            loaded = model.load_weights(list(weights.items()))
            # Snapshot first: on CPU, post-processing repacks linear weights.
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            process_weights_after_loading(model, spec.draft_model_config, torch.device("cpu"))
        return model.eval(), loaded, params

    return build


@pytest.fixture(scope="session")
def raw_tensors():
    """``raw_tensors(draft_dir)``: its tensors under their on-disk names."""
    return _raw_tensors


def _raw_tensors(draft: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if (draft / "pytorch_model.bin").is_file():
        return torch.load(draft / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return load_file(str(draft / "model.safetensors"))
