"""``train-drafter`` on vision-language targets, from LLaVA-format jsonl.

- bad jsonl (missing image, unreadable image, no ``<image>`` tag, no
  response): one clear error naming the line, exit 2, nothing written;
- an image-token id inside the text trains (masked out of the loss), a
  ``--seq-len`` that leaves no text is refused;
- the features the drafter trains on are the Hugging Face model's own
  forward (``input_ids`` + ``pixel_values``) for the tiny VLM, a stock
  ``LlavaForConditionalGeneration`` (``full`` strategy, no processor config)
  and a ``Qwen2_5_VLForConditionalGeneration``, whose M-RoPE positions are
  checked against the definition written out here;
- ``--image-inputs embeds`` and ``placeholder`` see the same batches and
  differ only at the placeholders; both targets train and export;
- ``--image-inputs none`` rows drop the image (no image token, no pixels,
  the vision tower never runs) but keep the image-conditioned answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eagle.checks import DrafterError
from eagle.mm_data import read_conversations
from eagle.train import TrainDrafterConfig, load_target, train_drafter

QUICK = dict(steps=2, seq_len=40, batch_size=4, draft_vocab_size=128, self_distill_sequences=4,
             progress=False)


def _conv(image: str, human: str = "<image>\nWhat is it?", answer: str | None = "A box.") -> dict:
    turns = [{"from": "human", "value": human}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return {"image": image, "conversations": turns}


def _write_jsonl(root: Path, rows: list[dict], sizes=((32, 32),)) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 256, 200, 90)).save(root / "img" / f"{i}.png")
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def random_vlm(tmp_path_factory) -> Path:
    from models.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("random-vlm"))


def _tokenizer_with(out: Path, tokens: list[str]):
    from models.tiny import build_tokenizer

    tok = build_tokenizer(out, vocab_size=512)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def stock_llava(tmp_path_factory) -> Path:
    """transformers' LLaVA as published checkpoints are: ``full`` feature
    strategy (CLS kept: 5 placeholders), second-to-last vision layer, no
    preprocessor config (pixels from the project's CLIP defaults)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("stock-llava")
    tok = _tokenizer_with(out, ["<image>"])
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="full", vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("qwen25vl")
    tok = _tokenizer_with(out, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    return out


# --- jsonl errors -----------------------------------------------------------

BAD_ROWS = {
    "missing_image": (_conv("img/9.png"), r"line 3: image .*9\.png not found"),
    "unreadable_image": (_conv("broken.png"), r"line 3: cannot read image .*broken\.png"),
    "no_image_tag": (_conv("img/0.png", human="What is it?"),
                     r"line 3: the human turn must hold exactly one <image> tag"),
    "no_response": (_conv("img/0.png", answer=None), r"line 3: the conversation has no response"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_jsonl_names_the_line(case, random_vlm, tmp_path, capsys):
    from vllm_plugins.cli import main

    row, message = BAD_ROWS[case]
    data = _write_jsonl(tmp_path, [_conv("img/0.png"), _conv("img/0.png"), row])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DrafterError, match=message):
        read_conversations(data)
    out = tmp_path / "out"
    code = main(["train-drafter", "--target", str(random_vlm), "--data", str(data), "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--data {data} line 3" in err and "Traceback" not in err, err
    assert not out.exists()


def test_seq_len_that_leaves_no_text(random_vlm, tmp_path):
    data = _write_jsonl(tmp_path, [_conv("img/0.png")])
    with pytest.raises(DrafterError, match=r"--seq-len 8: leaves no response text for --data .* line 1"):
        train_drafter(TrainDrafterConfig(target=random_vlm, data=data, out=tmp_path / "o",
                                         **{**QUICK, "seq_len": 8}))
    assert not (tmp_path / "o").exists()


# --- image token inside the text -------------------------------------------

def test_image_token_in_text_is_masked_not_a_crash(random_vlm, tmp_path):
    from transformers import AutoTokenizer

    from eagle.vlm_inputs import VLMInputs, build_examples, collate, label_mask

    answer = "It shows <image> and <image> again."
    data = _write_jsonl(tmp_path, [_conv("img/0.png", answer=answer)] * 4)
    target, tok = load_target(random_vlm), AutoTokenizer.from_pretrained(random_vlm)
    vlm = VLMInputs(target, random_vlm)
    rows = build_examples(vlm, tok, read_conversations(data), data, seq_len=40, distill=0, natural_text=True)
    batch = collate(rows, vlm.qwen, "cpu")
    in_text = (batch.ids == vlm.image_token_id) & ~batch.image_mask
    assert int(in_text.sum()) == 2 * 4 and int(batch.image_mask.sum()) == 16 * 4
    labels = label_mask(batch, vlm.image_token_id)
    assert not labels[in_text].any() and not labels[batch.image_mask].any()
    assert labels[batch.valid & ~batch.image_mask & ~in_text].all()
    # ...and a whole training run on it (the old path raised "Image features
    # and image tokens do not match").
    out = train_drafter(TrainDrafterConfig(target=random_vlm, data=data, out=tmp_path / "d",
                                           natural_text=True, **QUICK))
    assert (out / "model.safetensors").is_file()


# --- self-distilled responses end where the served ones do ----------------------

def test_self_distilled_responses_stop_at_eos(vlm_target, image_conversations):
    """Each distilled row is the prompt, then the target's greedy answer up
    to and including its first EOS, as vLLM serves it: nothing after it
    (forcing ``seq_len`` tokens past EOS trained the drafter mostly on text
    the served target never writes), and the answer equals HF's own greedy
    decode."""
    from transformers import AutoTokenizer

    from eagle.mm_data import load_image
    from eagle.vlm_inputs import VLMInputs, build_examples

    target, tok = load_target(vlm_target), AutoTokenizer.from_pretrained(vlm_target)
    vlm = VLMInputs(target, vlm_target)
    convs = read_conversations(image_conversations)[:6]
    seq_len = 128
    rows = build_examples(vlm, tok, convs, image_conversations, seq_len=seq_len, distill=6,
                          natural_text=False)
    eos = tok.eos_token_id
    assert len(rows) == 6
    for row in sorted(rows, key=lambda r: r.line):
        conv = convs[row.line - 1]
        prompt, _ = vlm.prompt_ids(tok, conv.prompt, row.n_image, "test")
        answer = row.ids[len(prompt):]
        assert row.ids[: len(prompt)] == prompt
        assert answer.count(eos) == 1 and answer[-1] == eos, tok.decode(answer)
        pixels, _ = vlm.pixels(load_image(image_conversations, conv))
        with torch.no_grad():
            ref = target.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels["pixel_values"],
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=seq_len, do_sample=False, pad_token_id=eos)
        assert answer == ref[0, len(prompt):].tolist()


# --- features equal the HF model's own forward --------------------------------

def _features_case(path: Path, root: Path, sizes):
    from transformers import AutoTokenizer

    from eagle.vlm_inputs import VLMInputs, build_examples

    target, tok = load_target(path), AutoTokenizer.from_pretrained(path)
    vlm = VLMInputs(target, path)
    rows_json = [_conv(f"img/{i}.png", answer="A box on a field.") for i in range(len(sizes))]
    data = _write_jsonl(root, rows_json, sizes)
    rows = build_examples(vlm, tok, read_conversations(data), data, seq_len=40, distill=len(sizes),
                          natural_text=False)
    return target, vlm, rows


@pytest.mark.parametrize("which", ["tiny_vlm", "stock_llava", "qwen_vl"])
def test_training_features_are_the_hf_forward(which, request, tmp_path):
    from eagle.features import target_features
    from eagle.vlm_inputs import collate

    path = request.getfixturevalue({"tiny_vlm": "random_vlm"}.get(which, which))
    sizes = [(90, 40), (56, 56)] if which == "qwen_vl" else [(32, 32), (40, 24)]
    target, vlm, rows = _features_case(path, tmp_path, sizes)
    for row in rows:  # one row at a time: the HF forward needs no padding
        batch = collate([row], vlm.qwen, "cpu")
        ours = target_features(target, None, (0, 1, 2), inputs_embeds=vlm.inputs_embeds(batch),
                               position_ids=vlm.positions(batch))
        extra = dict(batch.pixels)
        if vlm.qwen:
            extra["mm_token_type_ids"] = batch.image_mask.int()
        with torch.no_grad():
            ref = target(input_ids=batch.ids, **extra).logits
        torch.testing.assert_close(ours["logits"], ref, rtol=1e-5, atol=1e-5)
    if which == "stock_llava":
        assert rows[0].n_image == 5  # (28 / 14) ** 2 patches + CLS
    if which == "qwen_vl":
        # 90x40 -> 84x56 (smart_resize) -> 3x2 merged; 56x56 -> 2x2
        assert [r.n_image for r in rows] == [6, 4]


def test_qwen_mrope_positions_follow_the_definition(qwen_vl, tmp_path):
    """Text: one position per token on all three rows; an image of merged
    grid ``h x w``: temporal row constant, height and width rows the patch
    coordinates, all offset by the text before it; text after it continues
    from ``offset + max(h, w)``."""
    from eagle.vlm_inputs import collate

    _, vlm, rows = _features_case(qwen_vl, tmp_path, [(90, 40), (56, 56)])
    for row in rows:
        batch = collate([row], True, "cpu")
        got = vlm.positions(batch)[:, 0]
        h, w = [int(x) // 2 for x in batch.pixels["image_grid_thw"][0, 1:]]
        s, n = row.start, row.n_image
        expect = torch.zeros(3, len(row.ids), dtype=torch.long)
        expect[:, :s] = torch.arange(s)
        expect[0, s: s + n] = s
        expect[1, s: s + n] = s + torch.arange(h).repeat_interleave(w)
        expect[2, s: s + n] = s + torch.arange(w).repeat(h)
        expect[:, s + n:] = s + max(h, w) + torch.arange(len(row.ids) - s - n)
        assert torch.equal(got, expect)
        assert not torch.equal(got[1], got[0])  # really 3-D


def test_embeds_and_placeholder_see_the_same_batches(random_vlm, tmp_path):
    from transformers import AutoTokenizer

    from eagle.train import image_batches

    data = _write_jsonl(tmp_path, [_conv("img/0.png"), _conv("img/1.png", human="<image>\nTell me.")],
                        sizes=[(32, 32), (32, 32)])
    target, tok = load_target(random_vlm), AutoTokenizer.from_pretrained(random_vlm)
    draws = {}
    for mode in ("embeds", "placeholder"):
        cfg = TrainDrafterConfig(target=random_vlm, data=data, out=tmp_path / mode, image_inputs=mode,
                                 **QUICK)
        _, draw = image_batches(target, tok, cfg, torch.device("cpu"))
        draws[mode] = draw((0, 1, 2), torch.Generator().manual_seed(0))
    (fe, pe, me), (fp, pp, mp) = draws["embeds"], draws["placeholder"]
    assert torch.equal(fe["aux"], fp["aux"]) and torch.equal(fe["logits"], fp["logits"])
    assert torch.equal(pe, pp) and torch.equal(me, mp)
    differs = (fe["embeds"] != fp["embeds"]).any(-1)
    image_token = json.loads((random_vlm / "config.json").read_text())["image_token_index"]
    stock = target.get_input_embeddings().weight[image_token]
    assert int(differs.sum()) == 16 * 4  # every placeholder of the 4 rows, nothing else
    assert torch.equal(fp["embeds"][differs], stock.expand(int(differs.sum()), -1))


@pytest.mark.parametrize("which, mode", [("stock_llava", "placeholder"), ("qwen_vl", "embeds"),
                                         ("qwen_vl", "none")])
def test_vlm_targets_train_and_export(which, mode, request, tmp_path):
    from eagle.layouts import DRAFTER_ARCH, STOCK_ARCH, read_drafter
    from eagle.offline_eval import served_inputs, trained_inputs

    path = request.getfixturevalue(which)
    sizes = [(90, 40), (56, 56), (60, 60)] if which == "qwen_vl" else [(32, 32), (28, 28), (50, 30)]
    data = _write_jsonl(tmp_path, [_conv(f"img/{i}.png") for i in range(3)], sizes)
    out = train_drafter(TrainDrafterConfig(target=path, data=data, out=tmp_path / "d", image_inputs=mode,
                                           **{**QUICK, "steps": 3}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [DRAFTER_ARCH if mode == "embeds" else STOCK_ARCH]
    _, flat, state = read_drafter(out)
    # the offline evaluation feeds it what vLLM's class for it reads at image positions
    assert (served_inputs(flat), trained_inputs(out)) == ("embeds" if mode == "embeds" else "placeholder", mode)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if which == "qwen_vl":
        assert flat["rope_parameters"]["mrope_section"] == [4, 6, 6]


def test_llava15_geometry_puts_text_on_top_of_576_placeholders(tmp_path):
    """LLaVA-1.5's vision geometry (336 px, patch 14, ``default`` strategy):
    576 placeholders per image, and ``--seq-len`` counts the text only."""
    from PIL import Image
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    from eagle.vlm_inputs import VLMInputs, build_examples

    tok = _tokenizer_with(tmp_path, ["<image>"])
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                       num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=1024)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=1, image_size=336, patch_size=14, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    data = _write_jsonl(tmp_path / "data", [_conv("img/0.png", answer="A box. " * 40)], sizes=[(500, 375)])
    vlm = VLMInputs(model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    (row,) = build_examples(vlm, tok, read_conversations(data), data, seq_len=64, distill=0,
                            natural_text=True)
    assert row.n_image == 576 and row.ids[row.start: row.start + 576] == [cfg.image_token_index] * 576
    assert len(row.text_ids()) == 64 and len(row.ids) == 576 + 64
    pixels, n = vlm.pixels(Image.open(data.parent / "img" / "0.png").convert("RGB"))
    assert n == 576 and pixels["pixel_values"].shape == (1, 3, 336, 336)  # resized, center-cropped


# --- --image-inputs none: text only, as public drafters are trained ----------------

@pytest.mark.parametrize("which", ["tiny_vlm", "qwen_vl"])
def test_text_only_rows_drop_the_image(which, request, tmp_path, monkeypatch):
    """``none`` rows are the human turn's text in the chat template (no
    image token, no placeholders, no pixels), then the same answers the
    target wrote given the image; their features are the HF model's
    text-only forward, and the vision tower never runs for them."""
    from transformers import AutoTokenizer

    from eagle.vlm_inputs import VLMInputs, build_examples, collate, label_mask, vlm_features

    path = request.getfixturevalue({"tiny_vlm": "random_vlm"}.get(which, which))
    sizes = [(90, 40), (56, 56)] if which == "qwen_vl" else [(32, 32), (32, 32)]
    data = _write_jsonl(tmp_path, [_conv("img/0.png"), _conv("img/1.png", human="Tell me.\n<image>")], sizes)
    target, tok = load_target(path), AutoTokenizer.from_pretrained(path)
    vlm = VLMInputs(target, path)
    convs = read_conversations(data)
    kw = dict(seq_len=40, distill=2, natural_text=False)
    with_image = sorted(build_examples(vlm, tok, convs, data, **kw), key=lambda r: r.line)
    rows = sorted(build_examples(vlm, tok, convs, data, **kw, text_only=True), key=lambda r: r.line)
    assert [r.line for r in rows] == [1, 2]
    image_ids = {vlm.image_token_id}
    if which == "qwen_vl":
        image_ids |= {target.config.vision_start_token_id, target.config.vision_end_token_id}
    for row, ref, conv in zip(rows, with_image, convs):
        text = conv.prompt.replace("<image>", "").strip()
        prompt = tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"]
        ref_prompt, _ = vlm.prompt_ids(tok, conv.prompt, ref.n_image, "test")
        assert row.ids == prompt + ref.ids[len(ref_prompt):]  # same answer, prompt without the image
        assert not image_ids & set(row.ids) and row.n_image == 0 and row.pixels == {}

    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran for a text-only batch")

    monkeypatch.setattr(target.model, "get_image_features", no_vision)
    for row in rows:
        batch = collate([row], vlm.qwen, "cpu")
        assert batch.pixels == {} and not batch.image_mask.any() and label_mask(batch, vlm.image_token_id).all()
        feats, _ = vlm_features(vlm, batch, (0, 1, 2), "none")
        with torch.no_grad():
            ref = target(input_ids=batch.ids).logits
        torch.testing.assert_close(feats["logits"], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats["embeds"], target.get_input_embeddings()(batch.ids))


@pytest.mark.parametrize("mode", ["placeholder", "none"])
def test_stock_class_modes_refuse_the_multimodal_norms(mode, random_vlm, tmp_path):
    data = _write_jsonl(tmp_path, [_conv("img/0.png")])
    cfg = TrainDrafterConfig(target=random_vlm, data=data, out=tmp_path / "d", image_inputs=mode,
                             input_embeds_norm=True, **QUICK)
    with pytest.raises(DrafterError, match=f"--image-inputs {mode} exports for vLLM's stock"):
        cfg.validate()
    assert not (tmp_path / "d").exists()
