"""Bad input: a drafter that cannot work with its target is refused with one
clear error naming the file (vLLM drafter class) or the flag
(``train-drafter``), and ``train-drafter`` writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eagle.checks import DrafterError, check_aux_layer_ids, check_d2t


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


CASES = {
    "draft_vocab_too_large": (lambda c: c.update(draft_vocab_size=4096),
                              r"config\.json: draft vocabulary size 4096 is larger than the target's vocabulary \(512\)"),
    "hidden_size_mismatch": (lambda c: c.update(hidden_size=96, target_hidden_size=96),
                             r"config\.json: hidden_size 96 does not match the target's hidden size 128"),
    "aux_layer_beyond_depth": (lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[0, 1, 5]),
                               r"config\.json: aux hidden state layer id\(s\) \[5\] are beyond the target's depth"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_drafter_refuses_bad_config(case, llama_target, llama_drafter, vllm_drafter, tmp_path):
    edit, message = CASES[case]
    bad = _variant(llama_drafter, tmp_path / case, edit)
    with pytest.raises(DrafterError, match=message) as info:
        vllm_drafter(llama_target, bad)
    assert str(bad) in str(info.value)


def test_vllm_drafter_refuses_d2t_out_of_range(llama_target, llama_drafter, vllm_drafter, raw_tensors):
    weights = raw_tensors(llama_drafter)
    weights["d2t"] = weights["d2t"].clone()
    weights["d2t"][3] = 10_000
    with pytest.raises(DrafterError, match=r"d2t is out of range: draft id 3 maps to target id"):
        vllm_drafter(llama_target, llama_drafter, weights=weights)


def test_pure_checks():
    check_d2t(torch.tensor([0, 1, 1]), 4, "x")  # ids 0, 2, 3
    with pytest.raises(DrafterError, match="same target id"):
        check_d2t(torch.tensor([1, 0]), 4, "x")  # ids 1, 1
    with pytest.raises(DrafterError, match="out of range"):
        check_d2t(torch.tensor([-1]), 4, "x")
    check_aux_layer_ids([0, 1, 2], 2, "x")  # id == depth is the last layer's output
    with pytest.raises(DrafterError, match="repeat"):
        check_aux_layer_ids([1, 1, 2], 2, "x")


@pytest.mark.parametrize("flags, message", [
    (["--draft-vocab-size", "4096"], "--draft-vocab-size: draft vocabulary size 4096 is larger"),
    (["--aux-layer-ids", "0,1,9"], "--aux-layer-ids: aux hidden state layer id(s) [9] are beyond"),
    (["--ttt-steps", "0"], "--ttt-steps 0: must be at least 1"),
])
def test_train_drafter_cli_rejects(flags, message, llama_target, synthetic_text, tmp_path, capsys):
    from vllm_plugins.cli import main

    out = tmp_path / "out"
    code = main(["train-drafter", "--target", str(llama_target), "--data", str(synthetic_text),
                 "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()
    assert not any(p.name.startswith(".train-drafter-") for p in tmp_path.iterdir())
