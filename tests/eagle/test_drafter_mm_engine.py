"""In a real vLLM engine (the tiny VLM with the multimodal drafter, eagle3,
K=3, one image): the drafter's decoder reads, at every image placeholder,
exactly the target's image embedding (the projector's output), and at text
positions the token embedding. Forward hooks on the engine's own modules
record both, so this fails if the embeddings stop reaching the drafter
anywhere between the target and the drafter's decoder layer (e.g. a class
that keeps ``supports_multimodal_embeddings`` but drops them in
``embed_input_ids``).

The engine runs in a subprocess: this file is also the script
(``python test_drafter_mm_engine.py TARGET DRAFT IMAGE``); it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _engine_report(target: str, draft: str, image: str) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_plugins import register

    register()
    seen: dict[str, list] = {"image": [], "draft_embeds": []}

    def install(worker):
        runner = worker.model_runner
        target_model, drafter = runner.model, runner.drafter.model
        target_model.multi_modal_projector.register_forward_hook(
            lambda _m, _a, out: seen["image"].append(out.detach().clone()))
        drafter.model.layers[0].register_forward_pre_hook(
            lambda _m, _a, kw: seen["draft_embeds"].append(kw["embeds"].detach().clone()),
            with_kwargs=True)
        return type(drafter).__name__

    llm = LLM(target, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              speculative_config={"method": "eagle3", "model": draft, "num_speculative_tokens": 3})
    drafter_class = llm.collective_rpc(install)[0]
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nTell me a story."}],
                                           add_generation_prompt=True, tokenize=False)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": Image.open(image).convert("RGB")}},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    image_token = json.loads((Path(target) / "config.json").read_text())["image_token_index"]
    embed_table = llm.collective_rpc(
        lambda w: w.model_runner.drafter.model.model.embed_tokens.weight.detach().clone())[0]
    image_embeds = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["image"]])
    # The drafter's prefill: row k reads prompt token k + 1 (the last row the
    # first sampled token).
    ids = torch.tensor(out.prompt_token_ids[1:])
    prefill = seen["draft_embeds"][0][: ids.numel()]
    at_image, text = prefill[ids == image_token], prefill[ids != image_token]
    return {
        "drafter_class": drafter_class,
        "image_rows": int(image_embeds.shape[0]),
        "draft_image_rows": int(at_image.shape[0]),
        "max_abs_diff": float((at_image - image_embeds).abs().max())
        if at_image.shape == image_embeds.shape else None,
        "placeholder_vs_image": float((embed_table[image_token] - image_embeds).abs().max()),
        "text_max_abs_diff": float((text - embed_table[ids[ids != image_token]]).abs().max()),
        "draft_calls": len(seen["draft_embeds"]),
    }


@pytest.fixture(scope="module")
def report(vlm_target, vlm_drafter, tmp_path_factory):
    from PIL import Image

    image = tmp_path_factory.mktemp("engine-image") / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 60)).save(image)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, __file__, str(vlm_target), str(vlm_drafter), str(image)],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1])


def test_engine_runs_the_multimodal_drafter(report):
    assert report["drafter_class"] == "Eagle3MultimodalLlamaForCausalLM"
    assert report["draft_calls"] > 1  # prefill and draft steps ran


def test_drafter_reads_the_targets_image_embeddings(report):
    # One image of 16 placeholders, all of which the drafter reads at prefill
    # (its input ids are the prompt shifted by one).
    assert report["image_rows"] == 16
    assert report["draft_image_rows"] == 16
    assert report["max_abs_diff"] == 0.0
    # ...which differ from what a text-only drafter reads there.
    assert report["placeholder_vs_image"] > 1e-3


def test_drafter_reads_token_embeddings_elsewhere(report):
    assert report["text_max_abs_diff"] == 0.0


if __name__ == "__main__":
    result = _engine_report(*sys.argv[1:4])
    print(json.dumps(result), flush=True)
