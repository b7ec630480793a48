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
